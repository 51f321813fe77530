#!/usr/bin/env bash
# Real-kernel suite for the qcow2 target on ublk devices, checked against
# qemu-img (qemu-utils):
#   - ext4 on a qemu-img-created image: mkfs, files, fstrim, fsck; after
#     `userblk del`, `qemu-img check` is clean and qemu's reading of the
#     image (`qemu-img convert -O raw`, loop-mounted read-only) holds the
#     same files;
#   - fio write+verify (io_uring, direct, 4k-256k, QD 32) on a
#     `userblk create` image over a qcow2 backing file: clean check, the
#     backing file unchanged, qemu reads what the device read;
#   - kill -9 of the daemon in the middle of fio writes: no corruption
#     (leaks allowed), and the image opens again;
#   - -r: kill -9 mid-write and `userblk recover`: flushed data verifies;
#   - a read-only device (-o) refuses writes and reads as qemu-img does;
#   - a second writer on the same image is refused.
# Runs inside the VM (vm/run.sh), as root, from the repository root:
#   vm/run.sh -- vm/suite/qcow2.sh        (ONLY=regex: just matching cases)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
[ -e /dev/ublk-control ] || modprobe ublk_drv || true

# /run is a plain tmpfs in the VM (/tmp is an overlay); the images live there.
WORK=/run/qcow2-suite
MNT=/mnt/ub-qcow2
mkdir -p "$WORK" "$MNT"
# The cwd (the repository) is read-only in the guest: no fio state files.
FIO=(fio --ioengine=io_uring --direct=1 --output-format=terse --minimal --verify_state_save=0)

# ---- helpers ----------------------------------------------------------------

need() { # need TOOL...: skip the case when a tool is missing
    local t
    for t in "$@"; do command -v "$t" >/dev/null || skip "$t is not installed (apt-get install qemu-utils fio e2fsprogs)"; done
}

state_is() { [ "$(list_word "$1" 11)" = "$2" ]; }

# qemu-img check: no corruption; leaks only where allowed (exit 3).
check_clean() { # check_clean IMAGE [leaks-ok]
    local rc=0 out
    out=$(qemu-img check "$1" 2>&1) || rc=$?
    echo "qemu-img check $1 -> exit $rc:"
    echo "$out"
    if [ "$rc" = 3 ] && [ "${2:-}" = leaks-ok ]; then
        ! grep -qi "corruption" <<<"$out" || die "qemu-img check reports corruption"
        return 0
    fi
    [ "$rc" = 0 ] || die "qemu-img check $1: exit $rc"
    grep -q "No errors were found" <<<"$out" || die "qemu-img check $1 found something"
}

# The one-line summary of `qemu-img check` (leaks or "No errors").
check_line() {
    qemu-img check "$1" 2>&1 | grep -E 'leaked clusters were found|No errors were found|corruptions' | head -n 1
}

sum_of() { sha256sum <"$1" | cut -d' ' -f1; }

# Every file under DIR with its sha256, sorted by name.
tree_sums() { (cd "$1" && find . -type f -exec sha256sum {} + | sort -k2); }

# ---- cases --------------------------------------------------------------------

# ext4 on a ublk device over an image qemu-img made; then qemu reads it.
ext4_on_qemu_image() {
    need qemu-img mkfs.ext4 fsck.ext4 fstrim
    local img=$WORK/ext4.qcow2 raw=$WORK/ext4.raw id dev files
    rm -f "$img" "$raw"
    qemu-img create -q -f qcow2 "$img" 1G
    id=$(add_dev qcow2 -f "$img")
    dev=/dev/ublkb$id
    [ "$(cat "/sys/block/ublkb$id/size")" = $((1 << 21)) ] || die "$dev has $(cat "/sys/block/ublkb$id/size") sectors, expected 1 GiB"
    [ "$(cat "/sys/block/ublkb$id/ro")" = 0 ] || die "$dev is read-only"
    [ "$(cat "/sys/block/ublkb$id/queue/discard_max_bytes")" -gt 0 ] || die "$dev does not advertise discard"
    # mkfs discards the whole device first, then writes the tables.
    mkfs.ext4 -q -F "$dev"
    mount "$dev" "$MNT"
    cp -r crates docs vm "$MNT/"
    dd if=/dev/urandom of="$MNT/big" bs=1M count=64 status=none
    mkdir "$MNT/small"
    for i in $(seq 1 200); do head -c $((i * 517)) /dev/urandom >"$MNT/small/f$i"; done
    # Freed blocks go back to the image as discards.
    dd if=/dev/urandom of="$MNT/gone" bs=1M count=32 status=none
    sync -f "$MNT"
    rm "$MNT/gone" "$MNT"/small/f1?
    fstrim "$MNT"
    sync -f "$MNT"
    tree_sums "$MNT" >"$WORK/ext4.sums"
    files=$(wc -l <"$WORK/ext4.sums")
    umount "$MNT"
    fsck.ext4 -n -f "$dev" || die "fsck.ext4 found errors on $dev"
    del_dev "$id"
    check_clean "$img"
    # qemu's reading of the image holds the same file system and files.
    qemu-img convert -O raw "$img" "$raw"
    fsck.ext4 -n -f "$raw" || die "fsck.ext4 found errors in qemu-img's reading of the image"
    mount -o ro,loop,noload "$raw" "$MNT"
    tree_sums "$MNT" >"$WORK/ext4.qemu.sums"
    umount "$MNT"
    diff "$WORK/ext4.sums" "$WORK/ext4.qemu.sums" || die "files differ in qemu-img's reading of the image"
    echo "note: $files files identical in qemu's reading; image $(( $(stat -c %s "$img") >> 20 )) MiB; $(check_line "$img")"
    rm -f "$raw"
}

# fio write+verify on a `userblk create` image over a qcow2 backing file.
fio_verify_over_backing() {
    need qemu-img qemu-io fio
    local base=$WORK/base.qcow2 top=$WORK/top.qcow2 id dev before devsum
    rm -f "$base" "$top" "$WORK/base.raw" "$WORK/top.raw"
    # The base: random data, a zero cluster range, patterns and holes, 64 KiB clusters.
    truncate -s 256M "$WORK/base.src"
    dd if=/dev/urandom of="$WORK/base.src" bs=1M count=48 conv=notrunc status=none
    dd if=/dev/urandom of="$WORK/base.src" bs=1M count=16 seek=100 conv=notrunc status=none
    qemu-img convert -q -f raw -O qcow2 -o cluster_size=64k "$WORK/base.src" "$base"
    rm -f "$WORK/base.src"
    qemu-io -f qcow2 -c "write -z 8M 4M" -c "write -P 0xa5 200M 3M" -c "write -P 0x11 255M 1M" "$base" >/dev/null
    qemu-img convert -q -O raw "$base" "$WORK/base.raw"
    check_clean "$base"
    before=$(sum_of "$base")
    # The new image names its backing file relative to its own directory.
    ub create qcow2 -f "$top" --backing base.qcow2 -F qcow2
    qemu-img info "$top" | grep -q "virtual size: 256 MiB" || die "the new image does not take the backing file's size"
    id=$(add_dev qcow2 -f "$top")
    dev=/dev/ublkb$id
    # Before any write, the device reads as the backing file.
    cmp "$dev" "$WORK/base.raw" || die "$dev does not read as its backing file"
    # Writes of 4k-256k at 4 KiB alignment: most cover part of a cluster,
    # whose rest is copied up from the backing file.
    "${FIO[@]}" --name=verify --filename="$dev" --rw=randwrite --bsrange=4k-256k --iodepth=32 \
        --size=192M --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 >/dev/null \
        || die "fio write+verify failed"
    # Mixed reads and writes, verified as they go.
    "${FIO[@]}" --name=randrw --filename="$dev" --rw=randrw --bs=4k --iodepth=32 --offset=128M --size=64M \
        --io_size=16M --verify=crc32c --verify_fatal=1 >/dev/null || die "fio randrw verify failed"
    # What fio left alone still reads as the base.
    cmp -i $((192 << 20)) -n $((64 << 20)) "$dev" "$WORK/base.raw" || die "the untouched end differs from the backing file"
    devsum=$(sum_of "$dev")
    del_dev "$id"
    check_clean "$top"
    [ "$(sum_of "$base")" = "$before" ] || die "the backing file changed"
    qemu-img info "$top" | grep -q "backing file: base.qcow2" || die "the backing file name changed"
    # qemu reads the image (through its backing file) as the device did.
    qemu-img convert -q -O raw "$top" "$WORK/top.raw"
    [ "$(sum_of "$WORK/top.raw")" = "$devsum" ] || die "qemu-img reads the image differently from the device"
    echo "note: top $(( $(stat -c %s "$top") >> 20 )) MiB over a 256 MiB base; backing unchanged; $(check_line "$top")"
    rm -f "$WORK/base.raw" "$WORK/top.raw"
}

# kill -9 of the daemon in the middle of fio's writes (no recovery): the
# device dies, del removes it, and the image has no corruption (leaked
# clusters are allowed, as after a crash of qemu). A new daemon opens it.
kill9_mid_write() {
    need qemu-img fio
    local img=$WORK/kill.qcow2 id pid fiopid round cs
    for round in 1 2; do
        cs=$([ "$round" = 1 ] && echo 64K || echo 4K)
        rm -f "$img"
        ub create qcow2 -f "$img" --size 512M --cluster-size "$cs" >/dev/null
        id=$(add_dev qcow2 -f "$img")
        pid=$(list_word "$id" 7)
        fio --ioengine=io_uring --direct=1 --name=w --filename="/dev/ublkb$id" --rw=randwrite \
            --bsrange=4k-128k --iodepth=32 --size=100% --time_based --runtime=120 \
            --randrepeat=0 >"$WORK/kill-fio.out" 2>&1 &
        fiopid=$!
        sleep $((round + 2))
        kill -0 "$fiopid" 2>/dev/null || { cat "$WORK/kill-fio.out"; die "fio ended before the kill"; }
        kill -KILL "$pid"
        wait_for 40 state_is "$id" DEAD || die "device not DEAD after kill -9 (state $(list_word "$id" 11))"
        wait_for 60 sh -c "! kill -0 $fiopid 2>/dev/null" || { kill -KILL "$fiopid"; die "fio hung on a dead device"; }
        wait "$fiopid" 2>/dev/null || true
        ub del -n "$id"
        wait_for 10 test ! -e "/dev/ublkb$id" || die "/dev/ublkb$id still exists after del"
        check_clean "$img" leaks-ok
        echo "note: kill -9 after $((round + 2)) s of writes ($cs clusters): $(check_line "$img")"
        # The image opens again and reads in full.
        id=$(add_dev qcow2 -f "$img")
        dd if="/dev/ublkb$id" of=/dev/null bs=1M iflag=direct status=none || die "reading the image after the crash failed"
        del_dev "$id"
        check_clean "$img" leaks-ok
    done
}

# -r: kill -9 in the middle of writes, `userblk recover`; what was written
# and flushed before verifies on the new daemon, which writes on.
kill9_recover() {
    need qemu-img fio
    local img=$WORK/rec.qcow2 id pid fiopid
    rm -f "$img"
    ub create qcow2 -f "$img" --size 512M >/dev/null
    id=$(add_dev -r qcow2 -f "$img")
    local dev=/dev/ublkb$id
    # The first 128 MiB: fio's verifiable blocks, flushed at the end.
    "${FIO[@]}" --name=v --filename="$dev" --rw=randwrite --bsrange=4k-256k --iodepth=32 --size=128M \
        --verify=crc32c --do_verify=0 --end_fsync=1 >/dev/null || die "fio write failed"
    # Writes elsewhere, cut by the kill.
    fio --ioengine=io_uring --direct=1 --name=bg --filename="$dev" --rw=randwrite --bsrange=4k-128k \
        --iodepth=32 --offset=256M --size=256M --time_based --runtime=120 --randrepeat=0 \
        >"$WORK/rec-fio.out" 2>&1 &
    fiopid=$!
    sleep 3
    kill -0 "$fiopid" 2>/dev/null || { cat "$WORK/rec-fio.out"; die "fio ended before the kill"; }
    pid=$(list_word "$id" 7)
    kill -KILL "$pid"
    wait_for 30 state_is "$id" QUIESCED || die "not QUIESCED after kill -9 (state $(list_word "$id" 11))"
    ub recover -n "$id" >/dev/null
    wait_for 10 state_is "$id" LIVE || die "not LIVE after recover"
    [ "$(list_word "$id" 7)" != "$pid" ] || die "the daemon's pid did not change"
    sleep 1
    kill -INT "$fiopid" 2>/dev/null || true
    wait "$fiopid" 2>/dev/null || true
    # Same job, same seed: fio checks every block it wrote before the kill.
    "${FIO[@]}" --name=v --filename="$dev" --rw=randwrite --bsrange=4k-256k --iodepth=32 --size=128M \
        --verify=crc32c --verify_only --verify_fatal=1 >/dev/null || die "data flushed before the kill does not verify"
    # The new daemon writes and reads back as well.
    "${FIO[@]}" --name=after --filename="$dev" --rw=randwrite --bsrange=4k-256k --iodepth=32 \
        --offset=128M --size=96M --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 >/dev/null \
        || die "fio verify on the recovered daemon failed"
    del_dev "$id"
    check_clean "$img" leaks-ok
    echo "note: flushed data verified after kill -9 and recover; $(check_line "$img")"
}

# A read-only device refuses writes and reads as qemu-img reads the image.
read_only_device() {
    need qemu-img qemu-io
    local img=$WORK/ro.qcow2 raw=$WORK/ro.raw id id2 pid before out rc
    rm -f "$img" "$raw"
    # Data, zero clusters, compressed clusters and holes.
    head -c 16M /dev/urandom >"$WORK/ro-src"
    truncate -s 64M "$WORK/ro-src"
    qemu-img convert -q -c -f raw -O qcow2 "$WORK/ro-src" "$img"
    qemu-io -f qcow2 -c "write -P 0x3c 20M 5M" -c "write -z 2M 1M" -c "write -P 0xc3 63M 512k" "$img" >/dev/null
    rm -f "$WORK/ro-src"
    before=$(sum_of "$img")
    id=$(add_dev qcow2 -f "$img" -o)
    pid=$(list_word "$id" 7)
    [ "$(cat "/sys/block/ublkb$id/ro")" = 1 ] || die "the device is not read-only"
    ub list -n "$id" | grep -q '"read_only":true' || die "list does not say read_only"
    rc=0
    out=$(dd if=/dev/urandom of="/dev/ublkb$id" bs=4k count=1 seek=100 oflag=direct 2>&1) || rc=$?
    echo "dd write -> exit $rc: $out"
    [ "$rc" != 0 ] || die "a write to the read-only device succeeded"
    grep -qE "Read-only file system|Input/output error|Operation not permitted" <<<"$out" \
        || die "the write failed without EROFS/EIO/EPERM: $out"
    ! blkdiscard -o 0 -l 1M "/dev/ublkb$id" 2>/dev/null || die "a discard on the read-only device succeeded"
    kill -0 "$pid" || die "the daemon died after a refused write"
    state_is "$id" LIVE || die "the device is not LIVE after a refused write"
    # A second read-only device on the same image at once.
    id2=$(add_dev qcow2 -f "$img" --read-only)
    qemu-img convert -q -O raw "$img" "$raw"
    cmp "/dev/ublkb$id" "$raw" || die "the device reads differently from qemu-img"
    cmp "/dev/ublkb$id2" "$raw" || die "the second device reads differently from qemu-img"
    del_dev "$id2"
    del_dev "$id"
    [ "$(sum_of "$img")" = "$before" ] || die "the image changed under a read-only device"
    echo "note: write refused: ${out%%$'\n'*}"
    rm -f "$raw"
}

# One writer per image: a second writable device is refused with a clear
# error and leaves nothing behind; a read-only one is allowed.
second_writer_refused() {
    need qemu-img
    local img=$WORK/busy.qcow2 id id2 n
    rm -f "$img"
    qemu-img create -q -f qcow2 "$img" 64M
    id=$(add_dev qcow2 -f "$img")
    n=$(ub list | grep -c '^dev id')
    expect_fail "open for writing" ub add qcow2 -f "$img"
    [ "$(ub list | grep -c '^dev id')" = "$n" ] || die "the refused add left a device"
    printf 'first' | dd of="/dev/ublkb$id" bs=4k conv=sync oflag=direct status=none
    id2=$(add_dev qcow2 -f "$img" -o)
    del_dev "$id2"
    del_dev "$id"
    check_clean "$img"
    qemu-io -f qcow2 -c "read -v 0 5" "$img" | grep -q "first" || die "qemu-io does not read what the device wrote"
}

no_panics_logged() {
    ! grep -l panicked /run/userblk/*.log 2>/dev/null || die "a daemon panicked (see logs above)"
}

# ---- run ---------------------------------------------------------------------

echo "kernel $(uname -r); userblk $("$USERBLK" --version); $(qemu-img --version 2>/dev/null | head -n 1)"
cleanup_devices
plan 7
case_run "qcow2: ext4 on a qemu-img image, clean in qemu" ext4_on_qemu_image
case_run "qcow2: fio verify over a qcow2 backing file" fio_verify_over_backing
case_run "qcow2: kill -9 mid-write, no corruption" kill9_mid_write
case_run "qcow2 -r: kill -9, recover, flushed data verifies" kill9_recover
case_run "qcow2 -o: writes refused, reads as qemu-img" read_only_device
case_run "qcow2: a second writer is refused" second_writer_refused
case_run "no daemon panicked" no_panics_logged
cleanup_devices
rm -rf "$WORK"
summary
