#!/usr/bin/env bash
# Real-kernel suite for filters over ublk devices: runs inside the VM
# (vm/run.sh), as root. The error filter under a mounted ext4, stats and
# delay checked against the kernel's own request counts under fio verify,
# recovery of a filtered device, and flakey's power cuts through `ctl`.
# Usage: bash vm/suite/filters.sh   (from the repository root; USERBLK overrides the binary)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
[ -e /dev/ublk-control ] || modprobe ublk_drv || true
# Power cuts and failing writes make the kernel log I/O errors by the
# hundred: keep them off the console (failures still show the dmesg tail).
dmesg -n 1 2>/dev/null || true

WORK=/run/filters-suite
MNT=/mnt/ub-filters
mkdir -p "$WORK" "$MNT"
FIO=(fio --ioengine=io_uring --direct=1 --output-format=terse --minimal)

state_is() { [ "$(list_word "$1" 11)" = "$2" ]; }

# Field of `stats -n ID --json`: stats_field ID '["ops"]["read"]["count"]'.
stats_field() {
    ub stats -n "$1" --json | python3 -c "import json,sys; d=json.load(sys.stdin); print(d$2)"
}

# Field N of /sys/block/ublkbID/stat (1 reads, 3 read sectors, 5 writes, 7 write sectors).
blk_stat() { awk -v f="$2" '{print $f}' "/sys/block/ublkb$1/stat"; }

# ---- cases -------------------------------------------------------------------

error_under_ext4() { # failing writes: ext4 goes read-only, the daemon stays
    local id pid trigger=$WORK/fail-writes
    rm -f "$trigger"
    id=$(add_dev mem --size 128M --filter "error:ops=write,file=$trigger")
    pid=$(list_word "$id" 7)
    mkfs.ext4 -q -F "/dev/ublkb$id"
    mount -o errors=remount-ro "/dev/ublkb$id" "$MNT"
    echo "written before" >"$MNT/before"
    sync
    touch "$trigger"
    ! dd if=/dev/urandom of="$MNT/after" bs=64k count=16 conv=fsync status=none 2>"$WORK/dd.err" \
        || die "fsync succeeded while every write fails"
    cat "$WORK/dd.err"
    grep -q "Input/output error" "$WORK/dd.err" || die "fsync did not report EIO"
    # jbd2 cannot commit: the journal aborts, and ext4 "remounts read-only"
    # when it next starts a change, as on a real disk. (Since Linux 6.6 ext4
    # only shuts itself down, refusing changes with EROFS, and leaves the
    # mount flags, so /proc/mounts still says rw.)
    wait_for 30 sh -c "! touch $MNT/poke 2>/dev/null && dmesg | grep -q 'EXT4-fs (ublkb$id): Remounting filesystem read-only'" \
        || die "ext4 did not go read-only: $(dmesg | grep "ublkb$id" | tail -n 5)"
    dmesg | grep -E "EXT4-fs.*ublkb$id.*(Remounting filesystem read-only|Detected aborted journal)" | tail -n 3
    # Further changes fail (EROFS, or EIO from the aborted journal).
    expect_fail "Read-only file system\|Input/output error" touch "$MNT/more"
    kill -0 "$pid" || die "the daemon died"
    state_is "$id" LIVE || die "device not LIVE: $(list_word "$id" 11)"
    rm -f "$trigger"
    umount "$MNT"
    # Only the file system gave up: the device serves writes again.
    dd if=/dev/zero of="/dev/ublkb$id" bs=4k count=16 oflag=direct status=none || die "writes still fail"
    dd if="/dev/ublkb$id" of=/dev/null bs=4k count=16 iflag=direct status=none || die "reads fail"
    del_dev "$id"
}

stats_delay_fio() { # stats counts what the kernel counts, under fio verify
    local id f want got
    id=$(add_dev mem --size 64M --filter stats --filter delay:read=200us,write=300us)
    ub list -n "$id" | grep -q "filters stats:file=.* delay:read=200us,write=300us" || die "list lacks the stack"
    "${FIO[@]}" --name=verify --filename="/dev/ublkb$id" --rw=randwrite --bsrange=4k-64k --iodepth=8 \
        --size=16M --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 >/dev/null
    # The kernel's own counts (after merges and splits) are what reached the daemon.
    for f in "1 read count" "3 read bytes" "5 write count" "7 write bytes"; do
        set -- $f
        want=$(blk_stat "$id" "$1")
        [ "$3" = bytes ] && want=$((want * 512))
        wait_for 5 sh -c "[ \"\$($USERBLK stats -n $id --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"ops\"][\"$2\"][\"$3\"])')\" = $want ]" \
            || die "stats $2 $3 $(stats_field "$id" "[\"ops\"][\"$2\"][\"$3\"]"), the kernel counted $want"
        echo "$2 $3: $want"
    done
    [ "$(stats_field "$id" '["ops"]["write"]["errors"]')" = 0 ] || die "write errors counted"
    got=$(stats_field "$id" '["ops"]["read"]["latency_us"]["max"]')
    [ "$got" -ge 200 ] || die "reads were not delayed (max ${got} us)"
    echo "note: $(blk_stat "$id" 1) reads and $(blk_stat "$id" 5) writes counted alike by stats and the kernel"
    del_dev "$id"
}

recover_with_filters() { # a recoverable device keeps its stack and its data
    local id pid before after
    id=$(add_dev -r mem --size 64M --filter stats --filter delay:read=1ms)
    before=$(ub list -n "$id" | grep -E '^\s+filters ' | sed 's/stats-[0-9]*\.json/stats-PID.json/')
    [ -n "$before" ] || die "no filters line"
    dd if=/dev/urandom of="$WORK/pattern" bs=1M count=16 status=none
    dd if="$WORK/pattern" of="/dev/ublkb$id" bs=1M oflag=direct status=none
    pid=$(list_word "$id" 7)
    kill -KILL "$pid"
    wait_for 30 state_is "$id" QUIESCED || die "not QUIESCED after kill -9"
    ub recover -n "$id" >/dev/null
    wait_for 10 state_is "$id" LIVE || die "not LIVE after recover"
    after=$(ub list -n "$id" | grep -E '^\s+filters ' | sed 's/stats-[0-9]*\.json/stats-PID.json/')
    echo "before: $before"
    echo "after:  $after"
    [ "$before" = "$after" ] || die "the stack changed across recovery"
    cmp -n 16777216 "$WORK/pattern" "/dev/ublkb$id" || die "data lost across recovery"
    ub stats -n "$id" | grep -q "running" || die "the new daemon's stats are not there"
    del_dev "$id"
}

flakey_power_cut() { # held-back writes go, flushed ones stay, EIO while off
    local id q
    id=$(add_dev mem --size 64M --filter flakey)
    q=/sys/block/ublkb$id/queue
    [ "$(cat $q/write_cache)" = "write back" ] || die "no volatile cache advertised"
    [ "$(cat $q/fua)" = 1 ] || die "no FUA advertised"
    printf 'flushed' | dd of="/dev/ublkb$id" bs=4k conv=sync,fsync oflag=direct status=none
    printf 'FUA' | dd of="/dev/ublkb$id" bs=4k seek=1 conv=sync oflag=direct,dsync status=none
    printf 'held back' | dd of="/dev/ublkb$id" bs=4k seek=2 conv=sync oflag=direct status=none
    [ "$(dd if="/dev/ublkb$id" bs=4k skip=2 count=1 iflag=direct status=none | tr -d '\0')" = "held back" ] \
        || die "a held-back write does not read back"
    ub ctl -n "$id" powercut
    expect_fail "Input/output error" dd if="/dev/ublkb$id" of=/dev/null bs=4k count=1 iflag=direct
    state_is "$id" LIVE || die "device not LIVE while the power is off"
    ub ctl -n "$id" powerup
    [ "$(dd if="/dev/ublkb$id" bs=4k count=1 iflag=direct status=none | tr -d '\0')" = flushed ] || die "flushed write lost"
    [ "$(dd if="/dev/ublkb$id" bs=4k skip=1 count=1 iflag=direct status=none | tr -d '\0')" = FUA ] || die "FUA write lost"
    [ -z "$(dd if="/dev/ublkb$id" bs=4k skip=2 count=1 iflag=direct status=none | tr -d '\0')" ] \
        || die "an unflushed write survived the cut"
    ub ctl -n "$id" status
    del_dev "$id"
}

# ---- run ---------------------------------------------------------------------

echo "kernel $(uname -r); userblk $("$USERBLK" --version)"
cleanup_devices
plan 4
case_run "error filter under ext4: EIO, remount-ro, daemon LIVE, del" error_under_ext4
case_run "stats + delay under fio verify: counts match the kernel's" stats_delay_fio
case_run "recover a filtered device: same stack, same data" recover_with_filters
case_run "flakey: ctl powercut/powerup, FUA and flushed writes survive" flakey_power_cut
cleanup_devices
summary
