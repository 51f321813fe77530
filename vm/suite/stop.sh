#!/usr/bin/env bash
# Real-kernel suite for safe stop and the add-time flags of newer kernels:
# `del` refuses a mounted or open device and names the holder, `--force`
# stops it anyway, `--no-partitions`, and `--fail-io` recovery. On 7.0+ the
# kernel's TRY_STOP_DEV makes the check atomic; on older kernels the
# userspace check gives the same refusals, --no-partitions warns and
# --fail-io (6.13+) is refused.
# Runs inside the VM (vm/run.sh), as root, from the repository root.
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
WORK=/run/stop-suite
MNT=/mnt/ub-stop
mkdir -p "$WORK" "$MNT"

state_is() { [ "$(list_word "$1" 11)" = "$2" ]; }
kernel_has() { ub features --json | python3 -c 'import json,sys; sys.exit(sys.argv[1] not in json.load(sys.stdin)["names"])' "$1"; }
gone() { [ ! -e "/dev/ublkb$1" ] && [ ! -e "/dev/ublkc$1" ]; }

# The device is untouched by a refused del: LIVE, same daemon, readable.
untouched() { # untouched ID PID
    state_is "$1" LIVE || die "device $1 is $(list_word "$1" 11) after a refused del"
    [ "$(list_word "$1" 7)" = "$2" ] || die "device $1 has a new daemon after a refused del"
    dd if="/dev/ublkb$1" of=/dev/null bs=4k count=1 iflag=direct status=none || die "device $1 unreadable after a refused del"
}

refuses_mounted() {
    local id pid out
    id=$(add_dev mem --size 64M)
    pid=$(list_word "$id" 7)
    mkfs.ext4 -q -F "/dev/ublkb$id"
    mount "/dev/ublkb$id" "$MNT"
    expect_fail "ublkb$id is mounted on $MNT" ub del -n "$id"
    out=$(ub del -n "$id" 2>&1) || true
    [ "$(wc -l <<<"$out")" = 1 ] || die "not one line: $out"
    grep -q -- "--force" <<<"$out" || die "the refusal does not name --force: $out"
    untouched "$id" "$pid"
    echo still >"$MNT/f" && sync
    umount "$MNT"
    del_dev "$id"
}

refuses_open() {
    local id pid holder
    id=$(add_dev mem --size 16M)
    pid=$(list_word "$id" 7)
    sleep 600 <"/dev/ublkb$id" &
    holder=$!
    wait_for 5 has_stdin "$holder" "/dev/ublkb$id" || die "the holder did not open the device"
    expect_fail "ublkb$id is open by pid $holder (sleep)" ub del -n "$id"
    untouched "$id" "$pid"
    kill "$holder"; wait "$holder" 2>/dev/null || true
    del_dev "$id"
}

force_stops_mounted() {
    local id pid
    id=$(add_dev mem --size 64M)
    pid=$(list_word "$id" 7)
    mkfs.ext4 -q -F "/dev/ublkb$id"
    mount "/dev/ublkb$id" "$MNT"
    ub del -n "$id" --force || die "del --force failed"
    wait_for 10 gone "$id" || die "device $id still exists after del --force"
    wait_for 10 exited "$pid" || die "daemon $pid still running"
    [ ! -e "/run/userblk/$id.json" ] || die "state file left behind"
    umount -l "$MNT" 2>/dev/null || true
}

# del -a: each device on its own; a refusal is reported, the rest deleted.
del_all_reports_each() {
    local a b out rc=0
    a=$(add_dev mem --size 64M)
    b=$(add_dev mem --size 16M)
    mkfs.ext4 -q -F "/dev/ublkb$a"
    mount "/dev/ublkb$a" "$MNT"
    out=$(ub del -a 2>&1) || rc=$?
    echo "$out"
    [ "$rc" != 0 ] || die "del -a succeeded with a mounted device"
    grep -q "ublkb$a is mounted on $MNT" <<<"$out" || die "del -a did not name the mount: $out"
    wait_for 10 gone "$b" || die "del -a did not delete the unheld device $b"
    state_is "$a" LIVE || die "del -a stopped the mounted device"
    umount "$MNT"
    del_dev "$a"
}

# A mount in another mount namespace: no fd, not in this namespace's
# mountinfo nor init's. Only the kernel's TRY_STOP_DEV sees it.
kernel_check_sees_other_namespaces() {
    kernel_has SAFE_STOP_DEV || skip "this kernel has no SAFE_STOP_DEV: the userspace check cannot see a mount in another namespace (documented)"
    local id pid holder
    id=$(add_dev mem --size 64M)
    pid=$(list_word "$id" 7)
    ub list -n "$id" --json | grep -q '"SAFE_STOP_DEV"' || die "the device was not added with SAFE_STOP_DEV"
    mkfs.ext4 -q -F "/dev/ublkb$id"
    unshare -m --propagation private sh -c "mount /dev/ublkb$id $MNT && exec sleep 600" &
    holder=$!
    wait_for 10 sh -c "grep -q ' $MNT ' /proc/$holder/mountinfo" || die "the namespaced mount did not happen"
    expect_fail "kernel refused to stop it" ub del -n "$id"
    untouched "$id" "$pid"
    kill "$holder"; wait "$holder" 2>/dev/null || true
    del_dev "$id"
}

# A disk image whose MBR has one Linux partition from sector 2048.
partitioned_image() { # partitioned_image PATH
    truncate -s 64M "$1"
    python3 - "$1" <<'EOF'
import struct, sys
entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 64 * 2048 - 2048)
with open(sys.argv[1], "r+b") as f:
    f.seek(446); f.write(entry)
    f.seek(510); f.write(b"\x55\xaa")
EOF
}

no_partitions() {
    local id out img=$WORK/parted.img
    partitioned_image "$img"
    # Without the flag the partition shows up (the image is right).
    id=$(add_dev file -f "$img")
    udevadm settle 2>/dev/null || true
    wait_for 5 test -e "/sys/block/ublkb$id/ublkb${id}p1" || die "no ublkb${id}p1 without --no-partitions: the image has no partition table?"
    del_dev "$id"
    out=$(ub add file -f "$img" --no-partitions 2>&1) || die "add --no-partitions failed: $out"
    echo "$out"
    id=$(dev_id_of "$out")
    udevadm settle 2>/dev/null || true
    sleep 1
    if kernel_has NO_AUTO_PART_SCAN; then
        [ ! -e "/sys/block/ublkb$id/ublkb${id}p1" ] || die "ublkb${id}p1 exists with --no-partitions"
        ! grep -q "no-partitions" <<<"$out" || die "a warning on a kernel that has NO_AUTO_PART_SCAN: $out"
    else
        [ "$(grep -c -- "--no-partitions" <<<"$out")" = 1 ] || die "not one warning for --no-partitions: $out"
        [ -e "/sys/block/ublkb$id/ublkb${id}p1" ] || die "the fallback is documented to scan partitions"
        echo "note: --no-partitions falls back: partitions scanned, one warning"
    fi
    del_dev "$id"
}

fail_io() {
    local id pid rc=0 start took
    if ! kernel_has USER_RECOVERY_FAIL_IO; then
        local before after
        before=$(find /dev -maxdepth 1 -name 'ublkc*' | wc -l)
        expect_fail "Linux 6.13" ub add --fail-io mem --size 16M
        after=$(find /dev -maxdepth 1 -name 'ublkc*' | wc -l)
        [ "$before" = "$after" ] || die "a refused add --fail-io left a device behind"
        return 0
    fi
    id=$(add_dev --fail-io mem --size 16M)
    printf 'still here' | dd of="/dev/ublkb$id" oflag=direct,sync bs=512 conv=sync status=none
    pid=$(list_word "$id" 7)
    kill -KILL "$pid"
    wait_for 30 state_is "$id" FAIL_IO || die "device $id not FAIL_IO after kill -9 (state $(list_word "$id" 11))"
    start=$SECONDS
    timeout 20 dd if="/dev/ublkb$id" of=/dev/null bs=4k count=1 iflag=direct status=none 2>"$WORK/dd.err" || rc=$?
    took=$((SECONDS - start))
    [ "$rc" != 124 ] || die "a read waited instead of failing while no daemon ran"
    [ "$rc" != 0 ] || die "a read succeeded while no daemon ran"
    # The kernel ends the request with a target error: EREMOTEIO on 7.3.
    grep -qi "I/O error" "$WORK/dd.err" || die "the read did not fail with an I/O error: $(cat "$WORK/dd.err")"
    [ "$took" -le 5 ] || die "the read took ${took}s to fail"
    echo "note: read failed in ${took}s while no daemon ran: $(cat "$WORK/dd.err")"
    ub recover -n "$id" >/dev/null
    wait_for 10 state_is "$id" LIVE || die "device $id not LIVE after recover"
    [ "$(head -c 10 "/dev/ublkb$id")" = "still here" ] || die "data lost across fail-io recovery"
    del_dev "$id"
}

trap 'cleanup_devices; rm -rf "$WORK"' EXIT
modprobe ublk_drv 2>/dev/null || true
[ -e /dev/ublk-control ] || { echo "no ublk_drv"; exit 1; }
echo "kernel $(uname -r); $(ub features | head -n 1)"

plan 7
case_run "del refuses a mounted device, naming the mount" refuses_mounted
case_run "del refuses a device a process has open, naming the pid" refuses_open
case_run "del --force stops a mounted device" force_stops_mounted
case_run "del -a reports each refusal, deletes the rest" del_all_reports_each
case_run "kernel check: a mount in another namespace" kernel_check_sees_other_namespaces
case_run "--no-partitions" no_partitions
case_run "--fail-io: I/O fails at once while no daemon, recover serves again" fail_io
summary
