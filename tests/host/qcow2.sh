#!/usr/bin/env bash
# Host suite for the qcow2 target, against qemu-img (qemu-utils) on this
# machine, through the NBD frontend (qemu-img, qemu-io and fio's nbd
# engine as clients) and the FUSE frontend with a loop device (ext4):
#   - images made by qemu-img (v2 and v3, 4K to 2M clusters, compressed
#     clusters, raw and qcow2 backing files) read back byte for byte as
#     `qemu-img convert -O raw` reads them;
#   - the same qemu-io writes, zeroes and discards on a qcow2 export and on
#     a raw file give the same bytes, and `qemu-img check` finds nothing;
#   - fio write+verify and ext4 (mkfs, files, fsck) leave a clean image;
#   - kill -9 in the middle of writes leaves no corruption (leaks allowed);
#   - `userblk create` images pass `qemu-img check` and open in qemu-img;
#   - corrupt and hostile images are refused with a clear error.
# Runs as root; everything it starts lives in a private state directory
# and is deleted by id (never `del -a`).
# Usage: bash tests/host/qcow2.sh   (from the repository root; USERBLK overrides the binary)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

host_suite qcow2
MNT=$WORK/mnt
mkdir -p "$MNT"
SOCK=$WORK/nbd.sock
URI="nbd+unix:///?socket=$SOCK"

# Export IMAGE over NBD (extra add options after it); print the id.
export_nbd() { # export_nbd IMAGE [OPTIONS...]
    local img=$1 out id; shift
    rm -f "$SOCK"
    out=$(ub add qcow2 -f "$img" "$@" --frontend nbd --listen "unix:$SOCK") || { echo "$out" >&2; return 1; }
    echo "$out" >&2
    id=$(dev_id_of "$out")
    [ -n "$id" ] || die "no id in add output"
    echo "$id"
}

del_id() { ub del -n "$1" >/dev/null; }

# qemu-img check: no corruption; leaks only where allowed (exit 3).
check_clean() { # check_clean IMAGE [leaks-ok]
    local rc=0 out
    out=$(qemu-img check "$1" 2>&1) || rc=$?
    echo "qemu-img check $1 -> $rc: $out"
    if [ "$rc" = 3 ] && [ "${2:-}" = leaks-ok ]; then return 0; fi
    [ "$rc" = 0 ] || die "qemu-img check $1 exit $rc"
    grep -q "No errors were found" <<<"$out" || die "qemu-img check found something"
}

# A 48 MiB raw source: random data with zero runs and a hole, so
# images get data, zero and unallocated clusters.
make_source() {
    local src=$WORK/src.raw
    [ -s "$src" ] && return 0
    truncate -s 48M "$src"
    dd if=/dev/urandom of="$src" bs=1M count=6 conv=notrunc status=none
    dd if=/dev/urandom of="$src" bs=4k count=300 seek=3000 conv=notrunc status=none
    dd if=/dev/urandom of="$src" bs=1M count=2 seek=40 conv=notrunc status=none
    dd if=/dev/urandom of="$src" bs=512 count=3 seek=$(( (47 << 20) / 512 + 7 )) conv=notrunc status=none
}

# The export of IMAGE must read exactly as qemu-img reads IMAGE.
reads_as_qemu() { # reads_as_qemu IMAGE
    local img=$1 id
    qemu-img convert -O raw "$img" "$WORK/want.raw"
    id=$(export_nbd "$img" --read-only)
    qemu-img convert -f raw -O raw "$URI" "$WORK/got.raw"
    del_id "$id"
    cmp "$WORK/want.raw" "$WORK/got.raw" || die "$img: userblk reads differ from qemu-img's"
    echo "note: $(basename "$img"): $(qemu-img info "$img" | sed -n 's/^cluster_size: //p')-byte clusters, $(stat -c %s "$img") bytes, identical"
}

case_qemu_images_read_identically() {
    needs qemu-img cmp
    make_source
    local compat cs img
    for compat in 0.10 1.1; do
        for cs in 4k 64k 2M; do
            img=$WORK/v$compat-$cs.qcow2
            qemu-img convert -q -O qcow2 -o "compat=$compat,cluster_size=$cs" "$WORK/src.raw" "$img"
            reads_as_qemu "$img"
        done
    done
    # Compressed clusters (zlib), written by qemu-img convert -c.
    img=$WORK/compressed.qcow2
    qemu-img convert -q -c -O qcow2 -o cluster_size=64k "$WORK/src.raw" "$img"
    qemu-img check "$img" | grep -q "compressed clusters" || true
    reads_as_qemu "$img"
}

case_backing_chains_read_identically() {
    needs qemu-img qemu-io cmp
    make_source
    # raw <- mid (v2, 4K clusters) <- top (v3, 64K clusters, larger).
    cp "$WORK/src.raw" "$WORK/base.raw"
    qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k -b base.raw -F raw "$WORK/mid.qcow2"
    qemu-io -f qcow2 -c "write -P 0x11 1M 100k" -c "write -P 0x22 5000k 3M" "$WORK/mid.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$WORK/top.qcow2" 64M
    qemu-io -f qcow2 -c "write -P 0x33 1030k 10k" -c "write -z 2M 1M" -c "discard 8M 1M" "$WORK/top.qcow2" >/dev/null
    reads_as_qemu "$WORK/top.qcow2"
    # The same chain written through userblk: the bases never change.
    local before id
    before=$(sha256sum "$WORK/base.raw" "$WORK/mid.qcow2")
    id=$(export_nbd "$WORK/top.qcow2")
    qemu-io -f raw -c "write -P 0x44 3000k 300k" -c "write -P 0x55 60M 1M" "$URI" >/dev/null
    del_id "$id"
    [ "$(sha256sum "$WORK/base.raw" "$WORK/mid.qcow2")" = "$before" ] || die "a backing file was written"
    check_clean "$WORK/top.qcow2"
    qemu-io -f qcow2 -c "read -P 0x44 3000k 300k" -c "read -P 0x55 60M 1M" -c "read -P 0x33 1030k 10k" \
        "$WORK/top.qcow2" | grep -q "read 1048576" || die "qemu-io does not read back userblk's writes"
}

# One qemu-io script on a qcow2 export and on a raw file: same bytes.
case_writes_match_a_raw_copy() {
    needs qemu-img qemu-io cmp
    local img=$WORK/w.qcow2 raw=$WORK/w.raw id cmds=() i off len
    qemu-img create -q -f qcow2 -o cluster_size=64k "$img" 64M
    truncate -s 64M "$raw"
    for i in $(seq 1 150); do
        off=$(( (RANDOM * 32768 + RANDOM) % (64 * 2048 - 512) * 512 ))
        len=$(( (RANDOM % 256 + 1) * 512 ))
        case $((i % 7)) in
            0) cmds+=(-c "write -z $off $len") ;;
            1) cmds+=(-c "discard $(( off / 65536 * 65536 )) 131072") ;;
            *) cmds+=(-c "write -P $((i % 250 + 1)) $off $len") ;;
        esac
    done
    id=$(export_nbd "$img")
    qemu-io -f raw "${cmds[@]}" -c flush "$URI" >/dev/null
    del_id "$id"
    # Discard leaves zeroes in both (whole clusters here; raw: punch).
    qemu-io -f raw "${cmds[@]}" "$raw" >/dev/null
    check_clean "$img"
    qemu-img compare -f qcow2 -F raw "$img" "$raw" || die "the image and the raw copy differ"
    echo "note: 150 writes, zeroes and discards: image and raw copy identical; $(qemu-img check "$img" | tail -n 2 | head -n 1)"
}

case_fio_verify_then_check() {
    needs qemu-img fio
    local img=$WORK/f.qcow2 id
    ub create qcow2 -f "$img" --size 256M --cluster-size 64K
    id=$(export_nbd "$img")
    fio --name=v --ioengine=nbd --uri="$URI" --rw=randwrite --bsrange=4k-256k --size=200M \
        --iodepth=16 --verify=crc32c --verify_fatal=1 --verify_state_save=0 --output-format=terse --minimal >/dev/null \
        || die "fio verify failed"
    del_id "$id"
    check_clean "$img"
    # And the data is still there on a fresh daemon.
    id=$(export_nbd "$img")
    fio --name=v --ioengine=nbd --uri="$URI" --rw=randread --bsrange=4k-256k --size=200M \
        --iodepth=16 --verify=crc32c --verify_only --verify_fatal=1 --verify_state_save=0 --output-format=terse --minimal >/dev/null \
        || die "fio verify after reopening failed"
    del_id "$id"
}

case_ext4_through_fuse_loop() {
    [ "$(id -u)" = 0 ] || skip "needs root"
    [ -e /dev/fuse ] || skip "no /dev/fuse"
    [ -e /dev/loop-control ] || skip "no loop devices"
    needs qemu-img mkfs.ext4 e2fsck losetup
    local img=$WORK/e.qcow2 out id blk
    qemu-img create -q -f qcow2 "$img" 512M
    out=$(ub add qcow2 -f "$img" --frontend fuse --loop) || { echo "$out"; return 1; }
    id=$(dev_id_of "$out")
    blk=$(sed -n 's/.*frontend fuse block \([^ ]*\).*/\1/p' <<<"$out")
    [ -b "$blk" ] || die "no loop device: $out"
    mkfs.ext4 -q -F "$blk"
    mount "$blk" "$MNT"
    cp -r crates "$MNT/"
    dd if=/dev/urandom of="$MNT/big" bs=1M count=64 status=none
    sync
    (cd "$MNT" && find . -type f -exec sha256sum {} + | sort -k2) >"$WORK/sums"
    umount "$MNT"
    e2fsck -fn "$blk" || die "ext4 not clean on the device"
    del_id "$id"
    check_clean "$img"
    # qemu's view of the image holds the same file system.
    qemu-img convert -O raw "$img" "$WORK/e.raw"
    e2fsck -fn "$WORK/e.raw" >/dev/null || die "ext4 in qemu-img's reading is not clean"
    mount -o ro,loop "$WORK/e.raw" "$MNT"
    (cd "$MNT" && find . -type f -exec sha256sum {} + | sort -k2) | diff -q - "$WORK/sums" >/dev/null \
        || { umount "$MNT"; die "files differ in qemu-img's reading"; }
    umount "$MNT"
    echo "note: ext4 with $(wc -l <"$WORK/sums") files; $(qemu-img check "$img" | tail -n 2 | head -n 1)"
}

case_kill_mid_write_leaves_no_corruption() {
    needs qemu-img fio
    local img=$WORK/k.qcow2 id pid round
    for round in 1 2 3; do
        rm -f "$img"
        ub create qcow2 -f "$img" --size 512M --cluster-size $((4 << round))K
        id=$(export_nbd "$img")
        pid=$(list_word "$id" 7)
        fio --name=w --ioengine=nbd --uri="$URI" --rw=randwrite --bsrange=4k-128k --size=500M \
            --iodepth=32 --time_based --runtime=30 --output-format=terse --minimal >/dev/null 2>&1 &
        local fio_pid=$!
        sleep $((round + 1))
        kill -9 "$pid"
        wait "$fio_pid" 2>/dev/null || true
        ub del -n "$id" >/dev/null 2>&1 || true
        check_clean "$img" leaks-ok
        echo "note: kill -9 after $((round + 1)) s of writes ($((4 << round))K clusters): $(qemu-img check "$img" 2>&1 | grep -E 'leaked|No errors' | head -n 1)"
    done
}

case_userblk_create() {
    needs qemu-img
    local img
    for cs in 512 4K 64K 2M; do
        img=$WORK/c-$cs.qcow2
        ub create qcow2 -f "$img" --size 3G --cluster-size "$cs" >/dev/null
        check_clean "$img"
        qemu-img info "$img" | grep -q "virtual size: 3 GiB" || die "$img: wrong size"
    done
    cp "$WORK/c-64K.qcow2" "$WORK/base-c.qcow2"
    ub create qcow2 -f "$WORK/over.qcow2" --backing base-c.qcow2 >/dev/null
    qemu-img info "$WORK/over.qcow2" | grep -q "backing file: base-c.qcow2" || die "no backing file recorded"
    qemu-img info "$WORK/over.qcow2" | grep -q "backing file format: qcow2" || die "no backing format recorded"
    check_clean "$WORK/over.qcow2"
    expect_fail "exists" ub create qcow2 -f "$WORK/over.qcow2" --size 1G
    expect_fail "size" ub create qcow2 -f "$WORK/nosize.qcow2"
    expect_fail "cluster size" ub create qcow2 -f "$WORK/bad.qcow2" --size 1G --cluster-size 3000
    expect_fail "missing.raw" ub create qcow2 -f "$WORK/bad.qcow2" --backing missing.raw
}

# Corrupt images made by editing a good one's header or tables.
case_corrupt_images_refused() {
    needs qemu-img python3
    local good=$WORK/good.qcow2 bad=$WORK/bad.qcow2
    qemu-img create -q -f qcow2 "$good" 64M
    qemu-io -f qcow2 -c "write -P 1 0 128k" "$good" >/dev/null
    edit() { # edit OFFSET FORMAT VALUE: a struct.pack'd field of a copy of good
        cp "$good" "$bad"
        python3 -c "import struct,sys; f=open(sys.argv[1],'r+b'); f.seek(int(sys.argv[2])); f.write(struct.pack(sys.argv[3], int(sys.argv[4],0)))" \
            "$bad" "$1" "$2" "$3"
    }
    edit 0 '>I' 0x12345678;      expect_fail "not a qcow2" ub add qcow2 -f "$bad" --frontend nbd --listen "unix:$SOCK"
    edit 4 '>I' 9;               expect_fail "version" ub add qcow2 -f "$bad" --frontend nbd --listen "unix:$SOCK"
    edit 20 '>I' 40;             expect_fail "cluster_bits" ub add qcow2 -f "$bad" --frontend nbd --listen "unix:$SOCK"
    edit 36 '>I' 0x7fffffff;     expect_fail "L1 table" ub add qcow2 -f "$bad" --frontend nbd --listen "unix:$SOCK"
    edit 40 '>Q' 0x7000000000;   expect_fail "past the end" ub add qcow2 -f "$bad" --frontend nbd --listen "unix:$SOCK"
    edit 48 '>Q' 0x10001;        expect_fail "refcount table" ub add qcow2 -f "$bad" --frontend nbd --listen "unix:$SOCK"
    edit 32 '>I' 2;              expect_fail "encrypt" ub add qcow2 -f "$bad" --frontend nbd --listen "unix:$SOCK"
    edit 72 '>Q' 0x10000;        expect_fail "incompatible" ub add qcow2 -f "$bad" --frontend nbd --listen "unix:$SOCK"
    edit 72 '>Q' 1;              expect_fail "dirty" ub add qcow2 -f "$bad" --frontend nbd --listen "unix:$SOCK"
    # A backing file loop: a -> b -> a.
    qemu-img create -q -f qcow2 "$WORK/loop-a.qcow2" 64M
    qemu-img create -q -f qcow2 -b loop-a.qcow2 -F qcow2 "$WORK/loop-b.qcow2"
    qemu-img rebase -u -f qcow2 -b loop-b.qcow2 -F qcow2 "$WORK/loop-a.qcow2"
    expect_fail "loop" ub add qcow2 -f "$WORK/loop-a.qcow2" --frontend nbd --listen "unix:$SOCK"
    # An L2 table pointer past the end: opens, and the affected reads fail
    # with EIO while the daemon stays up.
    local l1 id
    l1=$(python3 -c "import struct; d=open('$good','rb').read(48); print(struct.unpack('>Q', d[40:48])[0])")
    edit "$l1" '>Q' "$(printf '0x%x' $(( (1 << 63) | (1 << 40) )))"
    id=$(export_nbd "$bad")
    ! qemu-io -f raw -c "read 0 4k" "$URI" 2>&1 | grep -q "^read 4096" || die "a read through a bad L2 pointer succeeded"
    [ "$(list_word "$id" 11)" = LIVE ] || die "the daemon died on a corrupt table"
    del_id "$id"
    [ ! -e "$WORK/state/$id.json" ] || die "state left behind"
}

cleanup_devices() {
    umount "$MNT" 2>/dev/null || true
    del_own_devices
}
trap 'cleanup_devices; rm -rf "$WORK"' EXIT

plan 8
case_run "qcow2: qemu-img images (v2/v3, 4K-2M, compressed) read identically" case_qemu_images_read_identically
case_run "qcow2: backing chains read identically, bases untouched" case_backing_chains_read_identically
case_run "qcow2: writes, zeroes, discards match a raw copy" case_writes_match_a_raw_copy
case_run "qcow2: fio verify, reopen, qemu-img check clean" case_fio_verify_then_check
case_run "qcow2: ext4 through FUSE + loop, clean in qemu-img" case_ext4_through_fuse_loop
case_run "qcow2: kill -9 mid-write, no corruption" case_kill_mid_write_leaves_no_corruption
case_run "qcow2: userblk create images pass qemu-img check" case_userblk_create
case_run "qcow2: corrupt and hostile images refused" case_corrupt_images_refused
summary
