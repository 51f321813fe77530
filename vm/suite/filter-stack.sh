#!/usr/bin/env bash
# Real-kernel suite for filter stacks on ublk devices: cow over a read-only
# file with stats and delay at once (fio verify), ext4 on a cow device
# (mkfs, mount, fsck, kill -9 and recover), and a write-back cache under
# ext4. Runs inside the VM (vm/run.sh), as root, from the repository root.
# Usage: bash vm/suite/filter-stack.sh   (USERBLK overrides the binary)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
[ -e /dev/ublk-control ] || modprobe ublk_drv || true

# /run is a plain tmpfs in the VM.
WORK=/run/filter-stack-suite
MNT=/mnt/ub-stack
mkdir -p "$WORK" "$MNT"
FIO=(fio --ioengine=io_uring --direct=1 --output-format=terse --minimal --verify_state_save=0)

# A base image of SIZE with random data in its first MiBs.
make_base() { # make_base PATH SIZE RANDOM_MIB
    rm -f "$1"
    truncate -s "$2" "$1"
    dd if=/dev/urandom of="$1" bs=1M count="$3" conv=notrunc status=none
}

sum_of() { sha256sum <"$1" | cut -d' ' -f1; }

# Field of `stats -n ID --json`: stats_field ID '["ops"]["read"]["count"]'.
stats_field() {
    ub stats -n "$1" --json | python3 -c "import json,sys; d=json.load(sys.stdin); print(d$2)"
}

state_is() { [ "$(list_word "$1" 11)" = "$2" ]; }

queue_is() { # queue_is ID ATTR VALUE
    local v
    v=$(cat "/sys/block/ublkb$1/queue/$2")
    [ "$v" = "$3" ] || die "queue/$2 is '$v', expected '$3'"
}

# ---- cases --------------------------------------------------------------------

# cow over a read-only file, with stats and delay in the same stack; once
# with the delay above the cow (whole requests wait), once below it (the
# base's reads wait, copy-ups included).
cow_stats_delay() { # cow_stats_delay LABEL FILTERS...
    local label=$1; shift
    local img=$WORK/$label.img id before dev
    make_base "$img" 128M 32
    before=$(sum_of "$img")
    rm -f "$WORK/$label.cow"
    id=$(add_dev file -f "$img" --read-only "$@")
    dev=/dev/ublkb$id
    ub list -n "$id" | grep "filters" >&2
    [ "$(cat "/sys/block/ublkb$id/ro")" = 0 ] || die "the cow device is read-only"
    queue_is "$id" write_cache "write back"
    queue_is "$id" fua 1
    [ "$(cat "/sys/block/ublkb$id/queue/discard_max_bytes")" -gt 0 ] || die "no discard advertised"
    "${FIO[@]}" --name=verify --filename="$dev" --rw=randwrite --bsrange=512-256k --blockalign=512 \
        --iodepth=16 --size=64M --verify=crc32c --verify_fatal=1 --do_verify=1
    "${FIO[@]}" --name=rw --filename="$dev" --rw=randrw --bs=4k --iodepth=16 --offset=32M --size=64M \
        --io_size=8M --verify=crc32c --verify_fatal=1
    # Whatever fio did not touch is still the base's.
    cmp -i $((96 << 20)) -n $((32 << 20)) "$dev" "$img" || die "the untouched end differs from the base"
    sleep 1.2 # a fresh stats snapshot
    local reads writes p50
    reads=$(stats_field "$id" '["ops"]["read"]["count"]')
    writes=$(stats_field "$id" '["ops"]["write"]["count"]')
    p50=$(stats_field "$id" '["ops"]["write"]["latency_us"]["p50"]')
    echo "note: $label: $reads reads, $writes writes through stats; write p50 ${p50} us"
    [ "$reads" -gt 0 ] && [ "$writes" -gt 0 ] || die "stats counted nothing"
    del_dev "$id"
    [ "$(sum_of "$img")" = "$before" ] || die "the base image changed"
}

cow_delay_above() {
    cow_stats_delay above --filter stats --filter delay:read=1ms,write=2ms \
        --filter "cow:file=$WORK/above.cow"
    # stats is outermost: the 2 ms write delay is in its figures.
}

cow_delay_below() {
    cow_stats_delay below --filter stats --filter "cow:file=$WORK/below.cow,cluster=4K" \
        --filter delay:read=1ms
}

# ext4 on a cow device over a read-only image: mkfs, files, kill -9 and
# recover (the overlay is reopened by the new daemon), fsck; the image
# is untouched and a later device on the same overlay sees the files.
cow_ext4_recover() {
    local img=$WORK/e.img ov=$WORK/e.cow id before sum
    make_base "$img" 256M 1
    before=$(sum_of "$img")
    rm -f "$ov"
    id=$(add_dev -r file -f "$img" --read-only --filter "cow:file=$ov")
    mkfs.ext4 -q -F "/dev/ublkb$id"
    mount "/dev/ublkb$id" "$MNT"
    dd if=/dev/urandom of="$MNT/blob" bs=1M count=16 conv=fsync status=none
    for i in $(seq 1 100); do echo "file $i" >"$MNT/f$i"; done
    sync -f "$MNT"
    sum=$(sha256sum <"$MNT/blob")
    local pid
    pid=$(list_word "$id" 7)
    kill -KILL "$pid"
    wait_for 30 state_is "$id" QUIESCED || die "not QUIESCED after kill -9 (state $(list_word "$id" 11))"
    ub recover -n "$id" >/dev/null
    wait_for 10 state_is "$id" LIVE || die "not LIVE after recover"
    echo 3 >/proc/sys/vm/drop_caches
    [ "$(sha256sum <"$MNT/blob")" = "$sum" ] || die "fsync'd file changed across kill -9"
    [ "$(cat "$MNT/f77")" = "file 77" ] || die "synced small file lost"
    dd if=/dev/urandom of="$MNT/after" bs=1M count=4 conv=fsync status=none
    umount "$MNT"
    not_held "/dev/ublkb$id" "after umount of the recovered cow device"
    fsck.ext4 -n -f "/dev/ublkb$id" || die "fsck after recovery"
    del_dev "$id"
    [ "$(sum_of "$img")" = "$before" ] || die "the base image changed"
    id=$(add_dev file -f "$img" --read-only --filter "cow:file=$ov")
    fsck.ext4 -n -f "/dev/ublkb$id" || die "fsck of the reopened overlay"
    mount -o ro "/dev/ublkb$id" "$MNT"
    [ "$(sha256sum <"$MNT/blob")" = "$sum" ] && [ -f "$MNT/after" ] || die "the reopened overlay lost files"
    umount "$MNT"
    del_dev "$id"
}

# A write-back cache over a file under ext4: a volatile cache and FUA
# advertised, fsck clean, and after del the file holds the device.
cache_writeback_ext4() {
    local img=$WORK/c.img id sum
    rm -f "$img"
    truncate -s 256M "$img"
    id=$(add_dev file -f "$img" --filter cache:size=32M,mode=writeback --filter stats)
    queue_is "$id" write_cache "write back"
    queue_is "$id" fua 1
    # More than the cache holds, so evictions write back as fio goes.
    "${FIO[@]}" --name=v --filename="/dev/ublkb$id" --rw=randwrite --bsrange=4k-64k --size=64M \
        --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1
    mkfs.ext4 -q -F "/dev/ublkb$id"
    mount "/dev/ublkb$id" "$MNT"
    dd if=/dev/urandom of="$MNT/blob" bs=1M count=64 conv=fsync status=none
    sum=$(sha256sum <"$MNT/blob")
    umount "$MNT"
    fsck.ext4 -n -f "/dev/ublkb$id" || die "fsck"
    local dsum log=/run/userblk/$id.log
    dsum=$(sum_of "/dev/ublkb$id")
    del_dev "$id"
    grep "cache at exit" "$log" | tail -n 1 | sed 's/^.*INFO /note: /'
    [ "$(sum_of "$img")" = "$dsum" ] || die "the file does not hold what the device did"
    mount -o ro,loop "$img" "$MNT"
    [ "$(sha256sum <"$MNT/blob")" = "$sum" ] || die "the file system in the file lost data"
    umount "$MNT"
}

no_panics_logged() {
    ! grep -l panicked /run/userblk/*.log 2>/dev/null || die "a daemon panicked (see logs above)"
}

# ---- run ----------------------------------------------------------------------

echo "kernel $(uname -r); userblk $("$USERBLK" --version)"
cleanup_devices
plan 5
case_run "cow + stats + delay (above): fio verify, base unchanged" cow_delay_above
case_run "cow + stats + delay (below): fio verify, base unchanged" cow_delay_below
case_run "cow: ext4 mkfs/mount/fsck, kill -9 and recover" cow_ext4_recover
case_run "cache write-back: ext4, fsck, data reaches the file" cache_writeback_ext4
case_run "no daemon panicked" no_panics_logged
cleanup_devices
summary
