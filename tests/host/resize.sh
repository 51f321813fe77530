#!/usr/bin/env bash
# Host suite for `userblk resize` on the FUSE and NBD frontends: runs on
# this machine directly (any kernel with FUSE and loop devices), as root.
# A mounted ext4 grows online (resize2fs) on mem, file, qcow2 and s3 devices
# served through FUSE + loop; bad requests change nothing; NBD refuses.
# (ublk: vm/suite/resize.sh.)
# Usage: bash tests/host/resize.sh   (from the repository root; USERBLK overrides the binary)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

host_suite resize
MNT=/mnt/ub-resize
mkdir -p "$MNT"
M=$((1 << 20))

needs_host() {
    [ "$(id -u)" = 0 ] || skip "needs root"
    [ -e /dev/fuse ] || skip "no /dev/fuse"
    [ -e /dev/loop-control ] || modprobe loop 2>/dev/null || skip "no loop devices"
    needs mkfs.ext4 resize2fs fsck.ext4
}

size_of() { blockdev --getsize64 "$1"; }
list_size() { ub list -n "$1" --json | python3 -c 'import json,sys; d=json.load(sys.stdin)[0]; print(d["target"]["size"])'; }


case_mem_ext4_grows_online() {
    needs_host
    local id blk
    read -r id blk < <(add_served --frontend fuse --loop mem --size 64M)
    grow_ext4 "$id" "$blk" "$MNT"
    grep -q -- "134217728\|201326592" <(ub list -n "$id" --json) || die "saved state without the new size"
    python3 -c 'import json,sys; a=json.load(open(sys.argv[1]))["args"]; assert "201326592" in a, a' \
        "$USERBLK_STATE_DIR/$id.json" || die "saved add arguments (for recover) keep the old size"
    del_served "$id"
}

case_file_ext4_grows_online() {
    needs_host
    local id blk img=$WORK/disk.img
    truncate -s 64M "$img"
    read -r id blk < <(add_served --frontend fuse --loop file --file "$img")
    grow_ext4 "$id" "$blk" "$MNT"
    [ "$(stat -c %s "$img")" = $((192 * M)) ] || die "the image file was not extended"
    del_served "$id"
    fsck.ext4 -n -f "$img"
}

case_qcow2_ext4_grows_online() {
    needs_host
    needs qemu-img
    local id blk img=$WORK/disk.qcow2
    ub create qcow2 --file "$img" --size 64M --cluster-size 4K
    read -r id blk < <(add_served --frontend fuse --loop qcow2 --file "$img")
    grow_ext4 "$id" "$blk" "$MNT"
    expect_fail "only grows" ub resize -n "$id" --size 128M --allow-shrink
    del_served "$id"
    qemu-img check "$img"
    [ "$(qemu-img info --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')" = $((192 * M)) ] \
        || die "qemu-img does not see the new virtual size"
}

case_fuse_file_without_loop() {
    needs_host
    local id file
    read -r id file < <(add_served --frontend fuse mem --size 16M)
    ub resize -n "$id" --size 32M
    [ "$(stat -c %s "$file")" = $((32 * M)) ] || die "the FUSE file has $(stat -c %s "$file") bytes"
    dd if=/dev/urandom of="$file" bs=1M seek=31 count=1 conv=notrunc,fsync status=none
    ub resize -n "$id" --size 8M --allow-shrink
    [ "$(stat -c %s "$file")" = $((8 * M)) ] || die "the FUSE file did not shrink"
    del_served "$id"
}

case_bad_requests_change_nothing() {
    needs_host
    local id blk
    read -r id blk < <(add_served --frontend fuse --loop mem --size 64M)
    expect_fail "add --allow-shrink" ub resize -n "$id" --size 32M
    expect_fail "multiple of the device's block size 512" ub resize -n "$id" --size 1000
    expect_fail "greater than 0" ub resize -n "$id" --size 0
    expect_fail "invalid size" ub resize -n "$id" --size lots
    expect_fail "no device with id 999" ub resize -n 999 --size 1G
    [ "$(size_of "$blk")" = $((64 * M)) ] || die "a refused resize changed the device"
    [ "$(list_size "$id")" = $((64 * M)) ] || die "a refused resize changed the target"
    # A filter whose size is its own refuses, naming itself.
    del_served "$id"
    read -r id blk < <(add_served --frontend fuse --loop mem --size 64M --filter truncate:size=32M)
    expect_fail "truncate" ub resize -n "$id" --size 64M
    [ "$(size_of "$blk")" = $((32 * M)) ] || die "the truncated device changed"
    del_served "$id"
}

case_nbd_refuses() {
    needs_host
    local id uri
    read -r id uri < <(add_served --frontend nbd --listen "unix:$WORK/nbd.sock" mem --size 64M)
    expect_fail "NBD has no way to tell" ub resize -n "$id" --size 128M
    [ "$(list_size "$id")" = $((64 * M)) ] || die "the refused resize changed the target"
    del_served "$id"
}

# The s3 target over a local s3s-fs (tests/s3/server.sh); its pid in a file.
s3_up() {
    [ -x "$(bash tests/s3/server.sh path)" ] || skip "s3s-fs is not installed (tests/s3/server.sh install)"
    mkdir -p "$WORK/s3/vol"
    S3_PORT=$((20000 + RANDOM % 20000))
    S3S_LOG=$WORK/s3s.log bash tests/s3/server.sh start "$WORK/s3" "$S3_PORT" >"$WORK/s3s.pid" \
        || die "s3s-fs did not start"
    export AWS_ACCESS_KEY_ID=userblk-test-key AWS_SECRET_ACCESS_KEY=userblk-test-secret
}
s3_down() { [ -s "$WORK/s3s.pid" ] && bash tests/s3/server.sh stop "$(cat "$WORK/s3s.pid")"; rm -f "$WORK/s3s.pid"; }

case_s3_ext4_grows_online() {
    needs_host
    s3_up
    # --lease host: s3s-fs's conditional writes are not atomic.
    local id blk s3=(s3 --endpoint "http://127.0.0.1:$S3_PORT" --bucket vol --prefix r --chunk-size 1M --lease host)
    read -r id blk < <(add_served --frontend fuse --loop "${s3[@]}" --cache-dir "$WORK/c1" --size 64M)
    grow_ext4 "$id" "$blk" "$MNT"
    grep -q '"device_size": 201326592' "$WORK/s3/vol/r/manifest.json" || die "the manifest keeps the old size"
    del_served "$id"
    # Another cache, no --size: the manifest's size, the file system intact.
    read -r id blk < <(add_served --frontend fuse --loop "${s3[@]}" --cache-dir "$WORK/c2")
    [ "$(size_of "$blk")" = $((192 * M)) ] || die "re-opened at $(size_of "$blk") bytes"
    fsck.ext4 -n -f "$blk"
    # Shrink below the file system's end, grow back: zeroes there, not the old data.
    ub resize -n "$id" --size 32M --allow-shrink
    [ ! -e "$WORK/s3/vol/r/chunks/0000000000000020" ] || die "a chunk past the end is still in the bucket"
    ub resize -n "$id" --size 64M
    cmp -n $((32 * M)) -i $((32 * M)) "$blk" /dev/zero || die "data past the cut came back"
    del_served "$id"
    expect_fail "volume size mismatch" ub add s3 --endpoint "http://127.0.0.1:$S3_PORT" --bucket vol \
        --prefix r --chunk-size 1M --cache-dir "$WORK/c3" --size 192M --lease host --frontend fuse
    s3_down
}

cleanup_all() {
    umount "$MNT" 2>/dev/null || true
    del_own_devices
    s3_down 2>/dev/null || true
}
trap 'cleanup_all; rm -rf "$WORK"' EXIT

plan 7
case_run "mem over FUSE + loop: ext4 grows (resize2fs)" case_mem_ext4_grows_online
case_run "file over FUSE + loop: ext4 grows (resize2fs)" case_file_ext4_grows_online
case_run "qcow2 over FUSE + loop: ext4 grows (resize2fs)" case_qcow2_ext4_grows_online
case_run "FUSE file without a loop device grows and shrinks" case_fuse_file_without_loop
case_run "bad requests change nothing, in one line" case_bad_requests_change_nothing
case_run "NBD frontend refuses" case_nbd_refuses
case_run "s3 over FUSE + loop: ext4 grows, shrink + grow reads zeroes, reopen follows the manifest" case_s3_ext4_grows_online
summary
