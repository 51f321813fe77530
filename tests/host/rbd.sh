#!/usr/bin/env bash
# Suite of the rbd target against a one-node Ceph cluster (tests/ceph/cluster.sh,
# started here and stopped on exit): on a loop device over the FUSE frontend
# (the host, the default) or on ublk devices (vm/suite/rbd.sh, in the VM).
#
# Cases: fio randwrite+verify; ext4 mkfs/mount/fsck; kill -9 under an
# fsync'ing writer, then `recover` (ublk) or a new daemon (FUSE), every
# fsync'd block intact; a second add refused naming the holder (exit 3);
# copy to and from rbd:// (cmp); a missing pool, a missing image, an
# unknown client id, an unreachable monitor: one line, exit != 0, nothing
# left; the OSD stopped (SIGSTOP: its objects are in memstore, a kill would
# lose them) under writes: EIO within the op timeout, then I/O works again
# once it runs (SIGCONT); without librbd (hidden), `add rbd` says what to
# install and exits 4.
#
#   bash tests/host/rbd.sh [--frontend fuse|ublk]     (as root, from anywhere)
# Beside other runs: USERBLK_STATE_DIR=$(mktemp -d) unshare -m --propagation private bash tests/host/rbd.sh
# CEPH_TIMEOUT (seconds, default 120) bounds each wait of the cluster's start.
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

FRONTEND=fuse
while [ $# -gt 0 ]; do
    case $1 in
        --frontend) FRONTEND=$2; shift 2 ;;
        *) echo "usage: $0 [--frontend fuse|ublk]"; exit 2 ;;
    esac
done
case $FRONTEND in fuse|ublk) ;; *) echo "--frontend fuse or ublk"; exit 2 ;; esac

need_userblk
WORK=$(mktemp -d /var/tmp/userblk-rbd.XXXXXX)
export USERBLK_STATE_DIR=${USERBLK_STATE_DIR:-$WORK/state}
MNT=/mnt/ub-rbd
CEPH=tests/ceph/cluster.sh
CEPH_DIR=$WORK/ceph
T=${CEPH_TIMEOUT:-120}
FIO=(fio --output-format=terse --minimal --verify_state_save=0)
if [ "$FRONTEND" = fuse ]; then FE=(--frontend fuse --loop); else FE=(--frontend ublk); fi

cleanup() {
    umount "$MNT" 2>/dev/null || true
    [ -s "$WORK/osd.stopped" ] && kill -CONT "$(cat "$WORK/osd.stopped")" 2>/dev/null
    del_own_devices
    [ -d "$CEPH_DIR" ] && bash "$CEPH" stop "$CEPH_DIR" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT


# The cluster, started by the first case that needs it, with a pool `rbd`.
have_cluster() {
    have_frontend
    if ! command -v ceph-osd >/dev/null || [ ! -e /usr/lib/x86_64-linux-gnu/librbd.so.1 ]; then
        # CI installs ceph (scripts/test.sh): missing there, it is a failure.
        [ "${CI:-}" != true ] || die "ceph is not installed, and CI installs it"
        skip "ceph or librbd1 is not installed (tests/ceph/cluster.sh install)"
    fi
    if [ ! -s "$WORK/pool.ok" ]; then
        bash "$CEPH" start "$CEPH_DIR" >/dev/null || die "the cluster did not start"
        CEPH_CONF=$CEPH_DIR/ceph.conf timeout "$T" ceph osd pool create rbd 8 >/dev/null 2>&1 \
            || die "ceph osd pool create rbd failed"
        CEPH_CONF=$CEPH_DIR/ceph.conf timeout "$T" rbd pool init rbd || die "rbd pool init failed"
        echo ok >"$WORK/pool.ok"
    fi
    export CEPH_CONF=$CEPH_DIR/ceph.conf
}

rbd_() { timeout "$T" rbd "$@"; }
state_is() { [ "$(list_word "$1" 11)" = "$2" ]; }
daemon_pid() { ub list -n "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["pid"])'; }

# add_rbd IMAGE [OPTIONS...]: a device; prints "ID BLOCKDEV".
add_rbd() {
    local img=$1 out id dev; shift
    out=$(ub add rbd --pool rbd --image "$img" "$@" "${FE[@]}" 2>&1) || { echo "$out" >&2; return 1; }
    echo "$out" >&2
    id=$(dev_id_of "$out")
    [ -n "$id" ] || die "no id in add output"
    if [ "$FRONTEND" = fuse ]; then
        dev=$(sed -n 's/.*frontend [a-z]* block \([^ ]*\).*/\1/p' <<<"$out")
    else
        dev=/dev/ublkb$id
        wait_for 10 test -b "$dev" || die "$dev did not appear"
    fi
    echo "$id $dev"
}

# del_rbd ID: delete the device and wait for its daemon to end (a FUSE
# daemon outlives `del` while something still has the loop device open,
# udev's probe after a umount or fsck for one, and keeps the image's lock).
del_rbd() {
    local pid
    pid=$(daemon_pid "$1")
    ub del -n "$1"
    wait_for 30 exited "$pid" || die "daemon $pid still running 30 s after del"
}

# Nothing of ours is left: no device in `list`, no daemon, no loop device on our files.
nothing_left() {
    [ -z "$(ub list 2>/dev/null)" ] || die "a device was left: $(ub list)"
    ! losetup -a 2>/dev/null | grep -q "$USERBLK_STATE_DIR" || die "a loop device was left"
}

case_fio_verify() {
    have_cluster
    needs fio
    local id dev
    read -r id dev < <(add_rbd fio --size 64M)
    "${FIO[@]}" --name=v --filename="$dev" --rw=randwrite --bs=4k --size=32M --iodepth=16 \
        --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 >"$WORK/fio.out" \
        || { cat "$WORK/fio.out"; die "fio verify failed"; }
    # Sequential 1 MiB with FUA-free flushes: fsync at the end.
    "${FIO[@]}" --name=s --filename="$dev" --rw=write --bs=1M --size=32M --offset=32M --iodepth=4 \
        --ioengine=libaio --direct=1 --verify=md5 --do_verify=1 --end_fsync=1 >"$WORK/fio.out" \
        || { cat "$WORK/fio.out"; die "sequential fio verify failed"; }
    del_rbd "$id"
    # The data is in the image: read back through rbd itself.
    rbd_ export rbd/fio "$WORK/fio.img" >/dev/null 2>&1 || die "rbd export failed"
    [ "$(stat -c %s "$WORK/fio.img")" = $((64 << 20)) ] || die "exported image has the wrong size"
}

case_ext4_mkfs_mount_fsck() {
    have_cluster
    needs mkfs.ext4 fsck.ext4
    local id dev
    read -r id dev < <(add_rbd ext4 --size 128M)
    mkfs.ext4 -q -F "$dev"
    mkdir -p "$MNT"
    mount "$dev" "$MNT"
    head -c 8M /dev/urandom >"$WORK/f"
    cp "$WORK/f" "$MNT/f"
    sync
    umount "$MNT"
    fsck.ext4 -fn "$dev" >"$WORK/fsck.out" 2>&1 || { cat "$WORK/fsck.out"; die "fsck found errors"; }
    del_rbd "$id"
    # Again, on a new daemon: the files are in the image.
    read -r id dev < <(add_rbd ext4)
    mount "$dev" "$MNT"
    cmp "$WORK/f" "$MNT/f" || die "file differs after a new daemon"
    umount "$MNT"
    del_rbd "$id"
}

case_kill9_then_recover_under_a_writer() {
    have_cluster
    local id dev pid rec=() t0
    [ "$FRONTEND" = ublk ] && rec=(-r)
    read -r id dev < <(add_rbd kill --size 64M "${rec[@]}")
    : >"$WORK/fsynced"
    python3 tests/s3/fsync_writer.py write "$dev" "$WORK/fsynced" 0 $((64 << 20)) 400 \
        >"$WORK/writer.out" 2>&1 &
    local writer=$!
    wait_for 30 sh -c "[ \$(wc -l <'$WORK/fsynced') -ge 20 ]" || die "the writer made no progress"
    pid=$(daemon_pid "$id")
    kill -9 "$pid"
    wait_for 10 exited "$pid"
    t0=$SECONDS
    if [ "$FRONTEND" = ublk ]; then
        wait_for 30 state_is "$id" QUIESCED || die "device $id not QUIESCED after kill -9"
        ub recover -n "$id" >"$WORK/add.out" 2>&1 || { cat "$WORK/add.out"; die "recover failed"; }
        [ "$(list_word "$id" 11)" = LIVE ] || die "device $id not LIVE after recover"
    else
        # FUSE keeps no device across its daemon's death: a new one.
        ub del -n "$id" >/dev/null 2>&1 || true
        read -r id dev < <(add_rbd kill)
    fi
    echo "note: the dead daemon's lock broken and the image served again in $((SECONDS - t0))s"
    ((SECONDS - t0 < 20)) || die "taking over the dead daemon's lock took $((SECONDS - t0))s"
    wait "$writer" || true
    python3 tests/s3/fsync_writer.py check "$dev" "$WORK/fsynced" || die "fsync'd blocks lost across kill -9"
    echo "note: $(wc -l <"$WORK/fsynced") fsync'd 64 KiB writes around the kill, all intact"
    del_rbd "$id"
}

case_second_writer_refused_naming_the_holder() {
    have_cluster
    local id dev pid rc=0 out
    read -r id dev < <(add_rbd two --size 16M)
    pid=$(daemon_pid "$id")
    out=$(ub add rbd --pool rbd --image two "${FE[@]}" 2>&1) || rc=$?
    [ "$rc" = 3 ] || die "second add: exit $rc, not 3: $out"
    [ "$(wc -l <<<"$out")" = 1 ] || die "not one line: $out"
    grep -q "is locked by .*userblk daemon pid $pid" <<<"$out" || die "holder not named: $out"
    [ "$(ub list | grep -c '"image":"two"')" = 1 ] || die "the refused add left a device: $(ub list)"
    # --break-lock takes it from the live daemon (librbd blocklists that client).
    local id2 dev2
    read -r id2 dev2 < <(add_rbd two --break-lock)
    [ -n "$id2" ] || die "--break-lock did not take the image"
    del_own_devices
    nothing_left
}

case_copy_to_and_from_rbd() {
    have_cluster
    head -c 6M /dev/urandom >"$WORK/src"
    dd if=/dev/zero of="$WORK/src" bs=1M seek=6 count=0 status=none
    truncate -s 10M "$WORK/src"
    ub copy "$WORK/src" rbd://rbd/copied >/dev/null
    ub copy rbd://rbd/copied "$WORK/back" >/dev/null
    cmp "$WORK/src" "$WORK/back" || die "copy through rbd:// changed the data"
    [ "$(rbd_ info rbd/copied --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["size"])')" = $((10 << 20)) ] \
        || die "the created image has the wrong size"
    local rc=0
    ub copy rbd://rbd/nonesuch "$WORK/x" 2>"$WORK/err" || rc=$?
    [ "$rc" != 0 ] && grep -q "does not exist" "$WORK/err" || die "copy from a missing image: exit $rc, $(cat "$WORK/err")"
}

# refused WHAT ADD-ARGS...: add fails with one line matching WHAT, nothing left.
refused() {
    local what=$1 rc=0 out; shift
    out=$(timeout 120 "$USERBLK" add rbd "$@" "${FE[@]}" 2>&1) || rc=$?
    [ "$rc" != 0 ] && [ "$rc" != 124 ] || die "add $*: exit $rc: $out"
    [ "$(wc -l <<<"$out")" = 1 ] || die "add $*: not one line: $out"
    grep -q -- "$what" <<<"$out" || die "add $*: '$out' does not say '$what'"
    echo "note: $out"
    nothing_left
}

case_bad_pool_image_id_monitor_one_line_each() {
    have_cluster
    refused "pool nopool does not exist" --pool nopool --image x
    refused "image rbd/nonesuch does not exist" --pool rbd --image nonesuch
    refused "as client.nobody: Permission denied" --pool rbd --image nonesuch --id nobody
    # A monitor on a port nobody listens on: connecting times out.
    sed 's/^mon host = .*/mon host = [v2:127.0.0.1:9]/' "$CEPH_CONF" >"$WORK/away.conf"
    local t0=$SECONDS
    refused "connecting to the cluster.*timed out" --pool rbd --image x --conf "$WORK/away.conf" --op-timeout 5
    ((SECONDS - t0 < 60)) || die "the unreachable monitor took $((SECONDS - t0))s"
}

case_osd_stopped_under_writes_eio_then_resumes() {
    have_cluster
    local id dev osd t0 rc=0
    read -r id dev < <(add_rbd stall --size 16M --op-timeout 5)
    dd if=/dev/urandom of="$dev" bs=64k count=16 oflag=direct status=none
    osd=$(cat "$CEPH_DIR/run/osd.0.pid")
    kill -STOP "$osd"
    echo "$osd" >"$WORK/osd.stopped"
    t0=$SECONDS
    # With its flush: librbd's write-back cache may take the write itself.
    timeout 120 dd if=/dev/urandom of="$dev" bs=64k count=16 seek=32 oflag=direct conv=fsync status=none 2>"$WORK/dd.err" || rc=$?
    local took=$((SECONDS - t0))
    kill -CONT "$osd"
    rm -f "$WORK/osd.stopped"
    [ "$rc" != 0 ] && [ "$rc" != 124 ] || die "a write with the OSD stopped: exit $rc after ${took}s"
    echo "note: with the OSD stopped a write failed after ${took}s ($(head -n 1 "$WORK/dd.err"))"
    ((took < 60)) || die "the write took ${took}s to fail"
    # The OSD runs again: new I/O works on the same device.
    wait_for 60 dd if=/dev/urandom of="$dev" bs=64k count=16 seek=64 oflag=direct status=none \
        || die "no write works after the OSD came back"
    head -c 1M /dev/urandom >"$WORK/after"
    dd if="$WORK/after" of="$dev" bs=1M seek=2 oflag=direct conv=fsync status=none
    cmp -n $((1 << 20)) -i 0:$((2 << 20)) "$WORK/after" "$dev" || die "data written after the OSD came back differs"
    del_rbd "$id"
}

case_no_librbd_one_line_exit_4() {
    have_frontend
    local lib rc=0 out
    lib=$(readlink -f /usr/lib/x86_64-linux-gnu/librbd.so.1 2>/dev/null) && [ -e "$lib" ] \
        || skip "librbd1 is not installed here (the case hides it)"
    : >"$WORK/empty"
    # librbd hidden in a private mount namespace: the binary still runs.
    out=$(unshare -m --propagation private sh -c 'mount --bind "$1" "$2" && shift 2 && exec "$@"' _ \
        "$WORK/empty" "$lib" "$USERBLK" add rbd --pool rbd --image x "${FE[@]}" 2>&1) || rc=$?
    [ "$rc" = 4 ] || die "exit $rc, not 4: $out"
    [ "$(wc -l <<<"$out")" = 1 ] || die "not one line: $out"
    grep -q "librbd.so.1 not found: install Debian's librbd1" <<<"$out" || die "$out"
    ub --version >/dev/null
    nothing_left
}

plan 8
case_run "fio randwrite + verify" case_fio_verify
case_run "ext4 mkfs, mount, fsck, remount" case_ext4_mkfs_mount_fsck
case_run "kill -9 under a writer, then recover" case_kill9_then_recover_under_a_writer
case_run "second writer refused naming the holder" case_second_writer_refused_naming_the_holder
case_run "copy to and from rbd://" case_copy_to_and_from_rbd
case_run "missing pool/image, bad id, no monitor" case_bad_pool_image_id_monitor_one_line_each
case_run "OSD stopped under writes: EIO, then resumes" case_osd_stopped_under_writes_eio_then_resumes
case_run "without librbd: one line, exit 4" case_no_librbd_one_line_exit_4
summary
