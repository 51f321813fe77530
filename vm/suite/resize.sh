#!/usr/bin/env bash
# Real-kernel suite for `userblk resize` on ublk: with UBLK_F_UPDATE_SIZE
# (Linux 6.16+) a mounted ext4 on mem, file and qcow2 devices grows online
# (resize2fs) and checks clean; so does one on s3 (s3s-fs in the VM); a
# recovered device keeps its new size.
# Without it (6.12) resize refuses in one line and changes nothing.
# Runs inside the VM (vm/run.sh), as root, from the repository root.
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
WORK=/run/resize-suite
MNT=/mnt/ub-resize
mkdir -p "$WORK" "$MNT"
M=$((1 << 20))

modprobe ublk_drv 2>/dev/null || true
update_size() { ub features --json | python3 -c 'import json,sys; sys.exit("UPDATE_SIZE" not in json.load(sys.stdin)["names"])'; }
needs_update_size() { update_size || skip "this kernel has no UBLK_F_UPDATE_SIZE (the refusal case covers it)"; }
size_of() { blockdev --getsize64 "$1"; }
state_is() { [ "$(list_word "$1" 11)" = "$2" ]; }
# The daemon of device ID killed, a new one takes over its queues.
kill_and_recover() {
    kill -KILL "$(list_word "$1" 7)"
    wait_for 30 state_is "$1" QUIESCED || die "not QUIESCED after kill -9"
    ub recover -n "$1"
    wait_for 30 state_is "$1" LIVE || die "not LIVE after recover"
}

case_mem() {
    needs_update_size
    local id
    id=$(add_dev mem --size 64M)
    grow_ext4 "$id" "/dev/ublkb$id" "$MNT"
    ub list -n "$id" | grep -q "dev_capacity $((192 * M / 512))" || die "the kernel's parameters keep the old size"
    # Shrinking: only when allowed, and then the device follows.
    expect_fail "add --allow-shrink" ub resize -n "$id" --size 96M
    ub resize -n "$id" --size 96M --allow-shrink
    [ "$(size_of "/dev/ublkb$id")" = $((96 * M)) ] || die "did not shrink"
    del_dev "$id"
}

case_file() {
    needs_update_size
    local id img=$WORK/disk.img
    truncate -s 64M "$img"
    id=$(add_dev file --file "$img")
    grow_ext4 "$id" "/dev/ublkb$id" "$MNT"
    [ "$(stat -c %s "$img")" = $((192 * M)) ] || die "the image file was not extended"
    del_dev "$id"
    rm -f "$img"
}

case_qcow2() {
    needs_update_size
    local id img=$WORK/disk.qcow2
    rm -f "$img"
    ub create qcow2 --file "$img" --size 64M --cluster-size 4K
    id=$(add_dev qcow2 --file "$img")
    grow_ext4 "$id" "/dev/ublkb$id" "$MNT"
    expect_fail "only grows" ub resize -n "$id" --size 128M --allow-shrink
    del_dev "$id"
    if command -v qemu-img >/dev/null; then qemu-img check "$img"; fi
    rm -f "$img"
}

case_recover_keeps_the_size() {
    needs_update_size
    local id
    id=$(add_dev -r mem --size 32M)
    printf 'after the old end' | dd of="/dev/ublkb$id" bs=512 seek=$((48 * M / 512)) conv=sync oflag=direct status=none 2>/dev/null \
        && die "wrote past the end before the resize"
    ub resize -n "$id" --size 64M
    printf 'after the old end' | dd of="/dev/ublkb$id" bs=512 seek=$((48 * M / 512)) conv=sync oflag=direct status=none
    kill_and_recover "$id"
    [ "$(size_of "/dev/ublkb$id")" = $((64 * M)) ] || die "recovered at $(size_of "/dev/ublkb$id") bytes"
    dd if="/dev/ublkb$id" bs=512 skip=$((48 * M / 512)) count=1 iflag=direct status=none | grep -q 'after the old end' \
        || die "data past the old end lost across recovery"
    del_dev "$id"
}

case_s3() {
    needs_update_size
    [ -x "$(bash tests/s3/server.sh path)" ] || skip "s3s-fs is not installed (tests/s3/server.sh install)"
    ip link set lo up 2>/dev/null || true
    local id port=19090 ep
    rm -rf "$WORK/s3" "$WORK/s3c"
    mkdir -p "$WORK/s3/vol"
    S3S_LOG=$WORK/s3s.log bash tests/s3/server.sh start "$WORK/s3" "$port" >"$WORK/s3s.pid" || die "s3s-fs did not start"
    export AWS_ACCESS_KEY_ID=userblk-test-key AWS_SECRET_ACCESS_KEY=userblk-test-secret
    ep=http://127.0.0.1:$port
    # --lease host: s3s-fs's conditional writes are not atomic.
    id=$(add_dev -r s3 --endpoint "$ep" --bucket vol --prefix r --chunk-size 1M --cache-dir "$WORK/s3c" --size 64M --lease host)
    grow_ext4 "$id" "/dev/ublkb$id" "$MNT"
    grep -q '"device_size": 201326592' "$WORK/s3/vol/r/manifest.json" || die "the manifest keeps the old size"
    kill_and_recover "$id"
    [ "$(size_of "/dev/ublkb$id")" = $((192 * M)) ] || die "recovered at $(size_of "/dev/ublkb$id") bytes"
    fsck.ext4 -n -f "/dev/ublkb$id"
    del_dev "$id"
    bash tests/s3/server.sh stop "$(cat "$WORK/s3s.pid")"
}

case_refused_without_update_size() {
    ! update_size || skip "this kernel has UBLK_F_UPDATE_SIZE (the other cases cover it)"
    local id out
    id=$(add_dev mem --size 64M)
    expect_fail "needs Linux 6.16 or later" ub resize -n "$id" --size 128M
    out=$(ub resize -n "$id" --size 128M 2>&1) || true
    [ "$(wc -l <<<"$out")" = 1 ] || die "not one line: $out"
    [ "$(size_of "/dev/ublkb$id")" = $((64 * M)) ] || die "the device changed"
    ub list -n "$id" | grep -q '"size":67108864' || die "the target changed before the refusal"
    del_dev "$id"
}

trap 'umount "$MNT" 2>/dev/null; cleanup_devices' EXIT
echo "kernel $(uname -r); UPDATE_SIZE: $(update_size && echo offered || echo not offered)"
plan 6
case_run "mem: ext4 grows online, then shrinks (--allow-shrink)" case_mem
case_run "file: ext4 grows online" case_file
case_run "qcow2: ext4 grows online, shrink refused" case_qcow2
case_run "recover keeps the new size and its data" case_recover_keeps_the_size
case_run "s3: ext4 grows online, the manifest follows, recover keeps the size" case_s3
case_run "no UPDATE_SIZE: one line, nothing changed" case_refused_without_update_size
summary
