#!/usr/bin/env bash
# Host suite for NBD: userblk's NBD server checked by real clients (nbdinfo,
# nbdsh, qemu-img, qemu-io, fio's nbd engine), and the nbd target in front of
# nbdkit and qemu-nbd (served through the FUSE frontend and a loop device, so
# it runs on any kernel). Runs on this machine directly, as root.
# Usage: bash tests/host/nbd.sh   (from the repository root; USERBLK overrides the binary)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

need_userblk

WORK=$(mktemp -d /var/tmp/userblk-nbd.XXXXXX)
# Where this run's devices are recorded (USERBLK_STATE_DIR: beside other runs).
STATE=${USERBLK_STATE_DIR:-/run/userblk}
MNT=/mnt/ub-nbd
mkdir -p "$MNT"
FIO=(fio --output-format=terse --minimal --verify_state_save=0)
# python3-libnbd is Debian's: run nbdsh with Debian's python first in PATH.
NBDSH=(env PATH=/usr/bin:$PATH nbdsh)

# ---- helpers ------------------------------------------------------------------

# `add` an NBD export; print "ID URI".
add_nbd() { add_served "$@"; }

# Delete and check nothing is left: no daemon, no socket, no state.
del_nbd() {
    local id=$1 socks
    socks=$(ub list -n "$id" --json | python3 -c 'import json,sys; print(" ".join(l[5:] for l in json.load(sys.stdin)[0]["listen"] if l.startswith("unix:")))')
    del_served "$id"
    for s in $socks; do [ ! -e "$s" ] || die "socket $s left behind"; done
}

# Skip the case unless fio has its nbd engine (libnbd).
needs_fio_nbd() {
    needs fio
    fio --enghelp 2>/dev/null | grep -qw nbd || skip "this fio has no nbd engine"
}

# fio with its nbd engine on URI: fio_nbd URI FIO_ARGS...
fio_nbd() { local uri=$1; shift; "${FIO[@]}" --ioengine=nbd --uri="$uri" "$@"; }

info_json() { nbdinfo --json "$1"; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); e=d['exports'][0]; print(e$1)"; }

# A device served by the FUSE frontend + loop (the nbd target on this
# kernel); print "ID BLOCKDEV".
add_loop_dev() {
    local out id blk
    out=$(ub add "$@" --frontend fuse --loop) || { echo "$out" >&2; return 1; }
    echo "$out" >&2
    id=$(dev_id_of "$out")
    blk=$(sed -n 's/.*frontend fuse block \([^ ]*\).*/\1/p' <<<"$out")
    [ -b "$blk" ] || die "no loop device in: $out"
    echo "$id $blk"
}

# Servers are started without a command substitution: nbdkit started inside
# one stops serving after its first client.
start_nbdkit() { # start_nbdkit SOCK ARGS...: nbdkit in the background; sets SERVER_PID
    local sock=$1; shift
    nbdkit -f --unix "$sock" "$@" >"$WORK/nbdkit.log" 2>&1 &
    SERVER_PID=$!
    wait_for 10 nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 \
        || die "nbdkit did not start: $(cat "$WORK/nbdkit.log")"
}

# -t: serve every client, not just the first; -e 8: several at once, or a
# probe that comes after a client reconnected would wait behind it forever.
start_qemu_nbd() { # start_qemu_nbd SOCK FILE: sets SERVER_PID
    qemu-nbd -t -e 8 -f raw -k "$1" --cache=writeback "$2" >>"$WORK/qemu-nbd.log" 2>&1 &
    SERVER_PID=$!
    wait_for 10 timeout 5 nbdinfo --size "nbd+unix:///?socket=$1" >/dev/null 2>&1 \
        || die "qemu-nbd did not start: $(cat "$WORK/qemu-nbd.log")"
}

# ---- cases: the server ---------------------------------------------------------

case_nbdinfo_size_and_flags() {
    needs nbdinfo
    local id uri j
    read -r id uri < <(add_nbd mem --size 256M --listen "unix:$WORK/a.sock" --export-name disk0)
    [ "$uri" = "nbd+unix:///disk0?socket=$WORK/a.sock" ] || die "uri $uri"
    j=$(info_json "$uri")
    echo "$j"
    [ "$(field "['export-size']" <<<"$j")" = $((256 << 20)) ] || die "size"
    for f in can_flush can_fua can_trim can_zero can_fast_zero can_multi_conn can_cache can_df; do
        [ "$(field "['$f']" <<<"$j")" = True ] || die "$f should be true"
    done
    [ "$(field "['is_read_only']" <<<"$j")" = False ] || die "read-only"
    [ "$(field "['block_size_minimum']" <<<"$j")" = 512 ] || die "min block size"
    [ "$(field "['block_size_maximum']" <<<"$j")" = $((32 << 20)) ] || die "max block size"
    field "['contexts']" <<<"$j" | grep -q base:allocation || die "no base:allocation"
    # A read-only file export says so, and offers no trim or zeroes.
    truncate -s 64M "$WORK/ro.img"
    local id2 uri2
    read -r id2 uri2 < <(add_nbd file -f "$WORK/ro.img" --read-only --listen "unix:$WORK/ro.sock")
    j=$(info_json "$uri2")
    [ "$(field "['is_read_only']" <<<"$j")" = True ] || die "read-only file export not read-only"
    [ "$(field "['can_trim']" <<<"$j")" = False ] || die "read-only export offers trim"
    del_nbd "$id"; del_nbd "$id2"
}

case_nbdsh_semantics() {
    needs nbdsh
    "${NBDSH[@]}" -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed"
    local id uri
    read -r id uri < <(add_nbd mem --size 64M --listen "unix:$WORK/b.sock")
    "${NBDSH[@]}" --base-allocation -u "$uri" -c '
import os
MiB = 1 << 20
buf = os.urandom(3 * 65536)
h.pwrite(buf, 5 * MiB)
assert h.pread(len(buf), 5 * MiB) == buf, "read after write"
h.pwrite(buf[:4096], 8192, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8192) == buf[:4096], "FUA write"
h.flush()
h.trim(65536, 5 * MiB)
assert h.pread(65536, 5 * MiB) == bytes(65536), "trim reads as zeroes"
assert h.pread(65536, 5 * MiB + 65536) == buf[65536:131072], "trim went too far"
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 8192) == bytes(4096), "zero"
ext = []
def cb(meta, off, entries, err):
    assert meta == "base:allocation"
    ext.extend(zip(entries[0::2], entries[1::2]))
h.block_status(16 * MiB, 0, cb)
print("extents", ext)
pos, holes, data = 0, [], []
for length, flags in ext:
    (holes if flags & nbd.STATE_HOLE else data).append((pos, pos + length))
    pos += length
assert any(a <= 5 * MiB + 65536 < b for a, b in data), "written range not reported as data"
assert any(a <= 10 * MiB < b for a, b in holes), "never written range not reported as a hole"
# Requests outside the export get errors from the server, not corruption.
h.set_strict_mode(0)
for f in (lambda: h.pread(512, 64 * MiB), lambda: h.pwrite(bytes(512), 64 * MiB)):
    try:
        f(); raise SystemExit("past the end accepted")
    except nbd.Error as e:
        print("refused:", e.errno, e)
print("nbdsh ok")
'
    del_nbd "$id"
}

case_qemu_img_convert_compare() {
    needs qemu-img
    local id uri
    read -r id uri < <(add_nbd mem --size 64M --listen "unix:$WORK/c.sock")
    head -c $((64 << 20)) /dev/urandom >"$WORK/src.raw"
    # Punch holes so the copy has sparse parts as well.
    fallocate -p -o $((8 << 20)) -l $((16 << 20)) "$WORK/src.raw"
    qemu-img convert -n -f raw -O raw "$WORK/src.raw" "$uri"
    qemu-img compare -f raw -F raw "$WORK/src.raw" "$uri"
    qemu-img convert -f raw -O qcow2 "$uri" "$WORK/back.qcow2"
    qemu-img compare -f qcow2 -F raw "$WORK/back.qcow2" "$WORK/src.raw"
    # qemu-io: random writes and reads with patterns, some in flight at once.
    qemu-io -f raw "$uri" \
        -c 'aio_write -P 0x5a 0 64k' -c 'aio_write -P 0x6b 1M 128k' -c 'aio_flush' \
        -c 'read -P 0x5a 0 64k' -c 'read -P 0x6b 1M 128k' \
        -c 'write -z 2M 64k' -c 'read -P 0 2M 64k' -c 'discard 4M 1M' -c 'read -P 0 4M 1M' \
        | tee "$WORK/qemu-io.out"
    ! grep -qi "fail\|error\|mismatch" "$WORK/qemu-io.out" || die "qemu-io reported a problem"
    del_nbd "$id"
}

case_fio_nbd_verify_and_many_clients() {
    needs_fio_nbd
    local id uri
    read -r id uri < <(add_nbd mem --size 256M --listen "unix:$WORK/d.sock")
    fio_nbd "$uri" --name=v --rw=randwrite --bsrange=4k-256k \
        --iodepth=32 --size=256M --verify=crc32c --verify_fatal=1 --do_verify=1
    # Four clients at once, each on its own quarter, writing and verifying.
    fio_nbd "$uri" --name=par --numjobs=4 --rw=randrw --bs=4k \
        --iodepth=16 --size=64M --offset_increment=64M --io_size=16M --verify=crc32c --verify_fatal=1
    local n
    del_nbd "$id"
    n=$(grep -o "served [0-9]* connections" "$STATE/$id.log" | tail -n 1 | awk '{print $2}')
    [ "${n:-0}" -ge 5 ] || die "expected at least 5 connections, the daemon served ${n:-none}"
    echo "note: the daemon served $n connections"
}

# The early target answers writes before a worker stores them: the NBD
# server's slot machine must hold each reply until the store is done.
case_early_answers_held() {
    needs_fio_nbd
    local id uri
    read -r id uri < <(add_nbd early --size 64M --listen "unix:$WORK/early.sock")
    fio_nbd "$uri" --name=early --rw=randwrite --bsrange=4k-128k \
        --iodepth=32 --size=64M --verify=crc32c --verify_fatal=1 --verify_backlog=32 --do_verify=1
    del_nbd "$id"
}

case_tcp_export() {
    needs nbdinfo
    local id uri
    read -r id uri < <(add_nbd mem --size 32M --listen tcp:127.0.0.1:0)
    case "$uri" in nbd://127.0.0.1:[1-9]*/) ;; *) die "tcp uri $uri" ;; esac
    [ "$(info_json "$uri" | field "['export-size']")" = $((32 << 20)) ] || die "size over tcp"
    del_nbd "$id"
}

case_dead_daemon_cleanup() {
    local id uri pid
    read -r id uri < <(add_nbd mem --size 32M --listen "unix:$WORK/e.sock")
    pid=$(list_word "$id" 7)
    kill -9 "$pid"
    wait_for 5 exited "$pid"
    [ "$(list_word "$id" 11)" = DEAD ] || die "list should say DEAD"
    ub del -n "$id"
    [ ! -e "$WORK/e.sock" ] || die "socket left behind"
    [ ! -e "$STATE/$id.json" ] || die "state left behind"
    # The same address can be used again.
    read -r id uri < <(add_nbd mem --size 32M --listen "unix:$WORK/e.sock")
    del_nbd "$id"
}

# A dead device's socket path taken over by a new device: deleting the dead
# one must not unlink the live one's socket.
case_dead_daemon_socket_taken_over() {
    local id uri pid id2 uri2
    read -r id uri < <(add_nbd mem --size 32M --listen "unix:$WORK/t.sock")
    pid=$(list_word "$id" 7)
    kill -9 "$pid"
    wait_for 5 exited "$pid"
    read -r id2 uri2 < <(add_nbd mem --size 16M --listen "unix:$WORK/t.sock")
    ub del -n "$id"
    [ -S "$WORK/t.sock" ] || die "del -n $id removed device $id2's socket"
    [ "$(nbdinfo --size "$uri2")" = 16777216 ] || die "device $id2 no longer serves"
    [ ! -e "$STATE/$id.json" ] || die "state left behind"
    del_nbd "$id2"
}

# `del` refuses an export that clients use, naming them (a Unix client by
# its process, a TCP one by its address); --force stops it anyway.
case_del_refuses_connected_clients() {
    needs nbdsh
    local id uri tid turi holder tholder out
    read -r id uri < <(add_nbd mem --size 32M --listen "unix:$WORK/busy.sock")
    "${NBDSH[@]}" -u "$uri" -c 'import time; time.sleep(60)' &
    holder=$!
    wait_for 10 clients_connected "$id" || die "the client never connected"
    local rc=0
    out=$(ub del -n "$id" 2>&1) || rc=$?
    [ "$rc" = 3 ] || die "del of a device with a client connected: exit $rc, not 3 (in use): $out"
    grep -q "NBD clients are connected (pid [0-9]* (" <<<"$out" || die "del did not name the client: $out"
    grep -q -- "--force" <<<"$out" || die "del did not say --force: $out"
    [ "$(list_word "$id" 11)" = LIVE ] || die "refused del changed the device"
    ub del -n "$id" --force || die "del --force failed"
    # The client sleeps on; its connection is gone.
    kill "$holder" 2>/dev/null; wait "$holder" 2>/dev/null || true
    [ ! -e "$WORK/busy.sock" ] || die "socket left behind"
    # Over TCP the client is named by its address; once it goes, del works.
    read -r tid turi < <(add_nbd mem --size 16M --listen tcp:127.0.0.1:0)
    "${NBDSH[@]}" -u "$turi" -c 'import time; time.sleep(3)' &
    tholder=$!
    wait_for 10 clients_connected "$tid" || die "the tcp client never connected"
    out=$(ub del -n "$tid" 2>&1) && die "del with a tcp client succeeded"
    grep -q "(tcp 127.0.0.1:[0-9]*)" <<<"$out" || die "del did not name the tcp client: $out"
    wait "$tholder" 2>/dev/null || true
    wait_for 10 no_clients "$tid" || die "the tcp client is still counted after it left"
    del_nbd "$tid"
}
clients_connected() { ub ctl -n "$1" clients 2>/dev/null | grep -q "^nbd: [1-9][0-9]* connected"; }
no_clients() { ub ctl -n "$1" clients 2>/dev/null | grep -q "^nbd: 0 connected"; }

case_errors_are_clear() {
    expect_fail "expected unix:PATH or tcp:HOST:PORT" ub add mem --size 1M --listen /tmp/x.sock
    expect_fail "tcp:HOST:PORT" ub add mem --size 1M --listen tcp:nohost
    expect_fail "--listen is an NBD option" ub add mem --size 1M --frontend fuse --listen "unix:$WORK/f.sock"
    expect_fail "needs an address" ub add mem --size 1M --frontend nbd
    expect_fail "FUSE options" ub add mem --size 1M --listen "unix:$WORK/f.sock" --loop
    echo keep >"$WORK/notasock"
    expect_fail "not a socket" ub add mem --size 1M --listen "unix:$WORK/notasock"
    [ "$(cat "$WORK/notasock")" = keep ] || die "a file was replaced by a socket"
    local id uri
    read -r id uri < <(add_nbd mem --size 1M --listen "unix:$WORK/g.sock")
    expect_fail "another server" ub add mem --size 1M --listen "unix:$WORK/g.sock"
    del_nbd "$id"
    local before=$1
    [ "$(ls "$STATE"/ | grep -c json)" = "$before" ] || die "a failed add left state: $(ls "$STATE")"
}

# ---- cases: the nbd target -------------------------------------------------------

case_target_over_nbdkit_ext4() {
    needs nbdkit
    local kpid id blk sum
    start_nbdkit "$WORK/k.sock" memory 512M; kpid=$SERVER_PID
    read -r id blk < <(add_loop_dev nbd --uri "nbd+unix:///?socket=$WORK/k.sock")
    [ "$(blockdev --getsize64 "$blk")" = $((512 << 20)) ] || die "size"
    "${FIO[@]}" --name=v --filename="$blk" --ioengine=io_uring --direct=1 --rw=randwrite \
        --bsrange=4k-256k --iodepth=16 --size=128M --verify=crc32c --verify_fatal=1 --do_verify=1
    mkfs.ext4 -q -F "$blk"
    mount "$blk" "$MNT"
    dd if=/dev/urandom of="$MNT/blob" bs=1M count=24 status=none
    sum=$(sha256sum <"$MNT/blob")
    umount "$MNT"
    fsck.ext4 -n -f "$blk"
    echo 3 >/proc/sys/vm/drop_caches
    mount "$blk" "$MNT"
    [ "$(sha256sum <"$MNT/blob")" = "$sum" ] || die "blob changed"
    umount "$MNT"
    ub del -n "$id"
    kill "$kpid"; wait "$kpid" 2>/dev/null || true
}

case_target_survives_server_restart() {
    needs qemu-nbd
    local qpid id blk fpid
    truncate -s 256M "$WORK/q.img"
    start_qemu_nbd "$WORK/q.sock" "$WORK/q.img"; qpid=$SERVER_PID
    read -r id blk < <(add_loop_dev nbd --uri "nbd+unix:///?socket=$WORK/q.sock" --reconnect-timeout 30)
    "${FIO[@]}" --name=v --filename="$blk" --ioengine=io_uring --direct=1 --rw=randwrite \
        --bs=64k --iodepth=16 --size=192M --verify=crc32c --verify_fatal=1 --do_verify=1 \
        >"$WORK/fio.out" 2>&1 &
    fpid=$!
    sleep 1.5
    kill -9 "$qpid"; wait "$qpid" 2>/dev/null || true
    sleep 1.5
    start_qemu_nbd "$WORK/q.sock" "$WORK/q.img"; qpid=$SERVER_PID
    wait "$fpid" || die "fio failed across the restart: $(cat "$WORK/fio.out")"
    grep -q "reconnect" "$STATE/$id.log" || die "the daemon did not log a reconnect"
    [ "$(list_word "$id" 11)" = LIVE ] || die "device not LIVE after the restart"
    sync; blockdev --flushbufs "$blk"
    cmp -n $((192 << 20)) "$blk" "$WORK/q.img" || die "device and image differ"
    echo "note: $(grep -c -i reconnect "$STATE/$id.log") reconnect log lines"
    ub del -n "$id"
    kill "$qpid"; wait "$qpid" 2>/dev/null || true
}

case_userblk_to_userblk() {
    # userblk's nbd target against userblk's own NBD export: both ends ours.
    local sid uri id blk
    read -r sid uri < <(add_nbd mem --size 128M --listen "unix:$WORK/h.sock")
    read -r id blk < <(add_loop_dev nbd --uri "$uri")
    "${FIO[@]}" --name=v --filename="$blk" --ioengine=io_uring --direct=1 --rw=randrw \
        --bsrange=4k-1m --iodepth=32 --size=128M --io_size=256M --verify=crc32c --verify_fatal=1
    blkdiscard -o 0 -l 64M "$blk"
    [ "$(head -c $((64 << 20)) "$blk" | tr -d '\0' | wc -c)" = 0 ] || die "discarded range not zero"
    ub del -n "$id"
    del_nbd "$sid"
}

case_target_refusals() {
    needs qemu-nbd
    expect_fail "No such file" ub add nbd --uri "nbd+unix:///?socket=$WORK/missing.sock" --frontend fuse
    local qpid
    truncate -s 16M "$WORK/r.img"
    qemu-nbd -t -f raw -k "$WORK/r.sock" -x only "$WORK/r.img" >>"$WORK/qemu-nbd.log" 2>&1 &
    qpid=$!
    wait_for 10 nbdinfo --list "nbd+unix:///?socket=$WORK/r.sock" >/dev/null 2>&1
    expect_fail "NBD_REP_ERR_UNKNOWN" ub add nbd --uri "nbd+unix:///other?socket=$WORK/r.sock" --frontend fuse
    kill "$qpid"; wait "$qpid" 2>/dev/null || true
    [ "$(ls "$STATE"/ | grep -c json)" = "$1" ] || die "a refused add left state: $(ls "$STATE")"
}

# ---- run ----------------------------------------------------------------------

cleanup_all() {
    umount "$MNT" 2>/dev/null || true
    ub del -a >/dev/null 2>&1 || true
    pkill -f "nbdkit -f --unix $WORK/" 2>/dev/null || true
    pkill -f "qemu-nbd -t -f raw -k $WORK/" 2>/dev/null || true
}
trap 'cleanup_all; rm -rf "$WORK"' EXIT

[ "$(id -u)" = 0 ] || { echo "the NBD host suite needs root (loop devices, mounts)"; exit 2; }
[ -n "${TRACE:-}" ] && set -x
plan 14
case_run "nbdinfo: size, flags, block sizes, read-only" case_nbdinfo_size_and_flags
case_run "nbdsh: data, FUA, trim, zero, block status" case_nbdsh_semantics
case_run "qemu-img convert/compare, qemu-io" case_qemu_img_convert_compare
case_run "fio nbd engine: verify, 4 clients at once" case_fio_nbd_verify_and_many_clients
case_run "early-answering target: replies held until stored (fio verify)" case_early_answers_held
case_run "tcp export on a picked port" case_tcp_export
case_run "dead daemon: list says DEAD, del cleans up" case_dead_daemon_cleanup
case_run "dead daemon: del leaves a newer device's socket alone" case_dead_daemon_socket_taken_over
case_run "del refuses an export with clients connected, naming them; --force" case_del_refuses_connected_clients
states() { ls "$STATE"/ 2>/dev/null | grep -c json; }
case_run "bad addresses and options: clear errors" case_errors_are_clear "$(states)"
case_run "nbd target over nbdkit: fio verify, ext4" case_target_over_nbdkit_ext4
case_run "nbd target survives a qemu-nbd restart" case_target_survives_server_restart
case_run "nbd target over userblk's own export" case_userblk_to_userblk
case_run "nbd target: refused connections" case_target_refusals "$(states)"
summary
