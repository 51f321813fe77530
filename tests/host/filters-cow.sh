#!/usr/bin/env bash
# Host suite for the cow and cache filters, through the FUSE frontend and a
# loop device on this machine: cow over a read-only file image (fio verify,
# the image's checksum unchanged, reopening the overlay, a flushed write
# surviving kill -9, ext4 on a golden image), and cache in front of an
# nbdkit server (a second read pass served from the cache; write-back
# data reaching the server). Runs as root; everything it starts lives in
# a private state directory and is deleted by id (never `del -a`).
# Usage: bash tests/host/filters-cow.sh   (from the repository root; USERBLK overrides the binary)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

host_suite cow
MNT=$WORK/mnt
mkdir -p "$MNT"
FIO=(fio --output-format=terse --minimal --verify_state_save=0 --ioengine=io_uring --direct=1)
# Servers we started (cases run in subshells, so the list is a file).
SERVERS=$WORK/servers

# ---- helpers ------------------------------------------------------------------

needs_loop() {
    [ "$(id -u)" = 0 ] || skip "needs root"
    [ -e /dev/fuse ] || skip "no /dev/fuse"
    [ -e /dev/loop-control ] || skip "no /dev/loop-control"
    needs fio python3 losetup blockdev sha256sum
}

# `add` a device on a loop device; print "ID BLOCKDEV".
add_loop() {
    local r
    r=$(add_served "$@" --frontend fuse --loop) || return 1
    [ -b "${r#* }" ] || die "no loop device in: $r"
    echo "$r"
}

# Not lib.sh's del_dev: these devices are not ublk ones.
del_dev() { del_served "$@"; }

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

# Wait for a stats snapshot (one is written every second) taken after
# now, so it counts everything done before this call.
fresh_stats() {
    local id=$1 t
    t=$(date +%s.%N)
    wait_for 4 sh -c "$USERBLK stats -n $id --json | python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)[\"time\"] <= $t)'" \
        || die "the stats snapshot is not being refreshed"
}

start_nbdkit() { # start_nbdkit SOCK ARGS...: sets SERVER_PID
    local sock=$1; shift
    nbdkit -f --unix "$sock" "$@" >>"$WORK/nbdkit.log" 2>&1 &
    SERVER_PID=$!
    echo "$SERVER_PID" >>"$SERVERS"
    wait_for 10 nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 \
        || die "nbdkit did not start: $(cat "$WORK/nbdkit.log")"
}

stop_server() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# ---- cases: cow ---------------------------------------------------------------

case_cow_fio_verify() {
    needs_loop
    local id blk before after ov=$WORK/a.cow img=$WORK/a.img
    make_base "$img" 128M 16
    before=$(sum_of "$img")
    rm -f "$ov"
    read -r id blk < <(add_loop file -f "$img" --read-only --filter "cow:file=$ov")
    ub list -n "$id" | grep -q "filters cow:file=$ov,cluster=64K" || die "list: $(ub list -n "$id")"
    [ "$(blockdev --getro "$blk")" = 0 ] || die "the cow device is read-only"
    [ "$(blockdev --getsize64 "$blk")" = $((128 << 20)) ] || die "size"
    # Small writes inside clusters (copy-ups), large ones across them.
    "${FIO[@]}" --name=v --filename="$blk" --rw=randwrite --bsrange=512-256k --blockalign=512 \
        --iodepth=16 --size=100% --verify=crc32c --verify_fatal=1 --do_verify=1
    "${FIO[@]}" --name=rw --filename="$blk" --rw=randrw --bs=4k --iodepth=32 --size=100% \
        --io_size=16M --verify=crc32c --verify_fatal=1
    after=$(sum_of "$blk")
    del_dev "$id"
    [ "$(sum_of "$img")" = "$before" ] || die "the base image changed"
    [ -s "$ov" ] || die "no overlay kept"
    echo "note: overlay $(du -h "$ov" | cut -f1) allocated for a 128M device"
    # Reopened: the device reads back as it was.
    read -r id blk < <(add_loop file -f "$img" --read-only --filter "cow:file=$ov")
    [ "$(sum_of "$blk")" = "$after" ] || die "the reopened overlay reads differently"
    del_dev "$id"
    [ "$(sum_of "$img")" = "$before" ] || die "the base image changed"
}

case_cow_flush_survives_kill() {
    needs_loop
    local id blk pid ov=$WORK/k.cow img=$WORK/k.img data=$WORK/k.data
    make_base "$img" 64M 8
    rm -f "$ov"
    dd if=/dev/urandom of="$data" bs=1M count=4 status=none
    read -r id blk < <(add_loop file -f "$img" --read-only --filter "cow:file=$ov,cluster=4K")
    # Unaligned to clusters, then fsync: a flush reaches the cow.
    dd if="$data" of="$blk" bs=512 seek=2049 oflag=direct conv=notrunc,fsync status=none
    pid=$(list_word "$id" 7)
    kill -KILL "$pid"
    wait_for 5 exited "$pid" || die "daemon survived kill -9"
    ub del -n "$id"
    read -r id blk < <(add_loop file -f "$img" --read-only --filter "cow:file=$ov")
    cmp -n $((4 << 20)) -i $((2049 * 512)):0 "$blk" "$data" || die "flushed data lost across kill -9"
    # Around it, the base.
    cmp -n $((2049 * 512)) "$blk" "$img" || die "the base before the write changed"
    cmp -i $((2049 * 512 + (4 << 20))) "$blk" "$img" || die "the base after the write changed"
    del_dev "$id"
}

case_cow_ext4_golden_image() {
    needs_loop
    needs mkfs.ext4 fsck.ext4 mount umount
    local id blk before img=$WORK/golden.img ov=$WORK/g.cow
    rm -f "$img" "$ov"
    truncate -s 256M "$img"
    mkfs.ext4 -q -F "$img"
    mount -o loop "$img" "$MNT"
    echo "golden" >"$MNT/version"
    dd if=/dev/urandom of="$MNT/blob" bs=1M count=8 status=none
    umount "$MNT"
    before=$(sum_of "$img")
    read -r id blk < <(add_loop file -f "$img" --read-only --filter "cow:file=$ov")
    mount "$blk" "$MNT"
    [ "$(cat "$MNT/version")" = golden ] || die "the golden file is not there"
    echo "changed" >"$MNT/version"
    dd if=/dev/urandom of="$MNT/new" bs=1M count=16 status=none
    rm "$MNT/blob"
    umount "$MNT"
    fsck.ext4 -n -f "$blk" || die "fsck of the cow device"
    del_dev "$id"
    [ "$(sum_of "$img")" = "$before" ] || die "the golden image changed"
    fsck.ext4 -n -f "$img" || die "fsck of the golden image"
    # The overlay still holds the changes.
    read -r id blk < <(add_loop file -f "$img" --read-only --filter "cow:file=$ov")
    mount -o ro "$blk" "$MNT"
    [ "$(cat "$MNT/version")" = changed ] && [ -f "$MNT/new" ] && [ ! -e "$MNT/blob" ] \
        || die "the overlay lost the changes"
    umount "$MNT"
    del_dev "$id"
}

case_cow_throwaway_overlays() {
    needs_loop
    local id blk img=$WORK/t.img ov=$WORK/t.cow before
    make_base "$img" 32M 4
    before=$(sum_of "$img")
    rm -f "$ov"
    read -r id blk < <(add_loop file -f "$img" --read-only --filter "cow:file=$ov,keep=no")
    dd if=/dev/zero of="$blk" bs=64k count=16 oflag=direct conv=notrunc status=none
    [ -e "$ov" ] || die "no overlay while running"
    del_dev "$id"
    [ ! -e "$ov" ] || die "keep=no left the overlay"
    # No file at all: an unnamed temporary overlay.
    read -r id blk < <(add_loop file -f "$img" --read-only --filter cow)
    dd if=/dev/zero of="$blk" bs=64k count=16 oflag=direct conv=notrunc status=none
    cmp -n $((1 << 20)) "$blk" /dev/zero || die "the zeroes did not read back"
    del_dev "$id"
    [ "$(sum_of "$img")" = "$before" ] || die "the base image changed"
}

case_cow_refusals() {
    needs_loop
    local img=$WORK/r.img small=$WORK/r-small.img ov=$WORK/r.cow id blk
    make_base "$img" 32M 1
    truncate -s 16M "$small"
    rm -f "$ov"
    read -r id blk < <(add_loop file -f "$img" --read-only --filter "cow:file=$ov,cluster=16K")
    expect_fail "in use by another process" ub add file -f "$img" --read-only --filter "cow:file=$ov" \
        --frontend fuse --loop
    del_dev "$id"
    expect_fail "the overlay is for a base of 33554432 bytes, but this base has 16777216 bytes" \
        ub add file -f "$small" --read-only --filter "cow:file=$ov" --frontend fuse --loop
    expect_fail "the overlay has 16K clusters, not cluster=64K" \
        ub add file -f "$img" --read-only --filter "cow:file=$ov,cluster=64K" --frontend fuse --loop
    echo "not an overlay" >"$WORK/notes.txt"
    expect_fail "not a cow overlay" \
        ub add file -f "$img" --read-only --filter "cow:file=$WORK/notes.txt" --frontend fuse --loop
    [ "$(cat "$WORK/notes.txt")" = "not an overlay" ] || die "a file that is not an overlay was changed"
    expect_fail "a cluster is a power of two" ub add file -f "$img" --filter cow:cluster=3K --frontend fuse
    expect_fail "keep=yes needs file=" ub add file -f "$img" --filter cow:keep=yes --frontend fuse
    [ -z "$(ls "$USERBLK_STATE_DIR"/*.json 2>/dev/null)" ] || die "state left behind: $(ls "$USERBLK_STATE_DIR")"
}

# ---- cases: cache -------------------------------------------------------------

case_cache_second_pass_hits() {
    needs_loop
    needs nbdkit nbdinfo
    local kpid id blk first second log hit_bytes
    start_nbdkit "$WORK/c.sock" memory 256M; kpid=$SERVER_PID
    # stats under the cache counts what reaches the server.
    read -r id blk < <(add_loop nbd --uri "nbd+unix:///?socket=$WORK/c.sock" \
        --filter cache:size=64M --filter stats)
    dd if=/dev/urandom of="$blk" bs=1M count=32 oflag=direct conv=fsync status=none
    dd if="$blk" of=/dev/null bs=64k count=512 iflag=direct status=none
    fresh_stats "$id"
    first=$(stats_field "$id" '["ops"]["read"]["count"]')
    [ "$first" -gt 0 ] || die "the first pass did not reach the server"
    dd if="$blk" of=/dev/null bs=64k count=512 iflag=direct status=none
    fresh_stats "$id"
    second=$(stats_field "$id" '["ops"]["read"]["count"]')
    echo "note: reads reaching nbdkit: first pass $first, second pass $((second - first))"
    [ "$second" = "$first" ] || die "the second pass reached the server: $first then $second reads"
    log=$USERBLK_STATE_DIR/$id.log
    del_dev "$id"
    grep "cache at exit" "$log" | tail -n 1 | sed 's/^.*INFO /note: /'
    hit_bytes=$(sed -n 's/.*cache at exit: [0-9]* hits (\([0-9]*\) bytes).*/\1/p' "$log" | tail -n 1)
    [ "${hit_bytes:-0}" -ge $((32 << 20)) ] \
        || die "the cache did not count 32 MiB of hits: $(grep 'cache at exit' "$log")"
    stop_server "$kpid"
}

case_cache_writeback_reaches_the_server() {
    needs_loop
    needs nbdkit nbdinfo nbdcopy
    local kpid id blk sum log
    start_nbdkit "$WORK/w.sock" memory 128M; kpid=$SERVER_PID
    read -r id blk < <(add_loop nbd --uri "nbd+unix:///?socket=$WORK/w.sock" \
        --filter cache:size=16M,block=64K,mode=writeback --filter stats)
    # A write stays in the cache until the device is flushed.
    dd if=/dev/urandom of="$blk" bs=4k count=1 seek=10 oflag=direct conv=notrunc status=none
    fresh_stats "$id"
    [ "$(stats_field "$id" '["ops"]["write"]["count"]')" = 0 ] || die "a write-back write went down at once"
    blockdev --flushbufs "$blk"
    sync "$blk"
    fresh_stats "$id"
    [ "$(stats_field "$id" '["ops"]["write"]["count"]')" -ge 1 ] || die "a flush did not write the data down"
    [ "$(stats_field "$id" '["ops"]["flush"]["count"]')" -ge 1 ] || die "a flush did not reach the server"
    # More data than the cache holds: evictions write back as they go.
    "${FIO[@]}" --name=v --filename="$blk" --rw=randwrite --bsrange=4k-256k --iodepth=16 \
        --size=64M --verify=crc32c --verify_fatal=1 --do_verify=1
    sum=$(head -c $((64 << 20)) "$blk" | sha256sum | cut -d' ' -f1)
    log=$USERBLK_STATE_DIR/$id.log
    del_dev "$id"
    grep "cache at exit" "$log" | tail -n 1 | sed 's/^.*INFO /note: /'
    grep "cache at exit" "$log" | tail -n 1 | grep -qE "[1-9][0-9]* write-backs" || die "no write-backs counted"
    [ "$(nbdcopy "nbd+unix:///?socket=$WORK/w.sock" - | head -c $((64 << 20)) | sha256sum | cut -d' ' -f1)" = "$sum" ] \
        || die "the server does not hold what the device did"
    stop_server "$kpid"
}

case_cache_refusals() {
    needs_loop
    echo "mine" >"$WORK/mine.txt"
    expect_fail "is not a cache file; refusing to overwrite it" \
        ub add mem --size 16M --filter "cache:file=$WORK/mine.txt" --frontend fuse
    [ "$(cat "$WORK/mine.txt")" = mine ] || die "a file that is not a cache was changed"
    expect_fail "not writethrough or writeback" ub add mem --size 16M --filter cache:mode=fast --frontend fuse
    expect_fail "holds no 64K block" ub add mem --size 16M --filter cache:size=4K --frontend fuse
}

# ---- run ----------------------------------------------------------------------

# Only our own devices and servers: the ids in our private state directory.
cleanup_devices() {
    local p
    umount "$MNT" 2>/dev/null || true
    del_own_devices
    if [ -s "$SERVERS" ]; then
        while read -r p; do stop_server "$p"; done <"$SERVERS"
        : >"$SERVERS"
    fi
}
trap 'cleanup_devices; rm -rf "$WORK"' EXIT

plan 8
case_run "cow: fio verify over a read-only file, base unchanged" case_cow_fio_verify
case_run "cow: a flushed write survives kill -9" case_cow_flush_survives_kill
case_run "cow: ext4 on a golden image, image unchanged" case_cow_ext4_golden_image
case_run "cow: keep=no and unnamed overlays" case_cow_throwaway_overlays
case_run "cow: mismatched and foreign overlays refused" case_cow_refusals
case_run "cache: a second read pass is served from the cache" case_cache_second_pass_hits
case_run "cache: write-back data reaches the server" case_cache_writeback_reaches_the_server
case_run "cache: bad options and foreign files refused" case_cache_refusals
summary
