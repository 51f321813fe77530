#!/usr/bin/env bash
# Host suite for the FUSE frontend and `--frontend auto`: runs on this
# machine directly (any kernel with FUSE and loop devices), as root.
# Usage: bash tests/host/fuse.sh   (from the repository root; USERBLK overrides the binary)
# Beside other runs: USERBLK_STATE_DIR=DIR unshare -m --propagation private bash tests/host/fuse.sh
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }

WORK=$(mktemp -d /var/tmp/userblk-fuse.XXXXXX)
chmod 755 "$WORK"  # the user cases need to reach their directories
MNT=/mnt/ub-fuse
# Where this run's devices are recorded (USERBLK_STATE_DIR runs the suite
# beside other runs on the same machine, in its own mount namespace).
STATE=${USERBLK_STATE_DIR:-/run/userblk}
mkdir -p "$MNT"
FIO=(fio --output-format=terse --minimal --verify_state_save=0)

# ---- helpers ------------------------------------------------------------------

have_ublk() { [ -e /dev/ublk-control ] || modprobe ublk_drv 2>/dev/null; }

needs_host() {
    [ "$(id -u)" = 0 ] || skip "needs root"
    [ -e /dev/fuse ] || skip "no /dev/fuse"
}

needs_fallback() { # the cases about auto's fallback need a kernel without ublk
    needs_host
    ! have_ublk || skip "this kernel has ublk: auto picks it (the VM suite covers that)"
}

# Field N of the second line of `list -n ID` (7 = pid, 11 = state).
fuse_word() { ub list -n "$1" | sed -n 2p | awk -v w="$2" '{print $w}'; }

# `add` a device; print "ID BLOCKDEV" (BLOCKDEV is the loop device, or the file).
add_fuse() {
    local out id blk
    out=$(ub add "$@" 2>"$WORK/add.err") || { echo "$out" >&2; cat "$WORK/add.err" >&2; return 1; }
    echo "$out" >&2
    cat "$WORK/add.err" >&2
    ! grep ERROR "$WORK/add.err" || die "add passed on an error of its daemon"
    id=$(dev_id_of "$out")
    [ -n "$id" ] || die "no id in add output"
    blk=$(sed -n 's/.*frontend fuse block \([^ ]*\).*/\1/p' <<<"$out")
    [ -n "$blk" ] || die "add did not print the block device"
    [ "$(fuse_word "$id" 11)" = LIVE ] || die "device $id not LIVE"
    echo "$id $blk"
}

# The id of the device whose block device (or FUSE file) is $1.
id_of_block() { ub list --json | python3 -c "import json,sys; print([d['id'] for d in json.load(sys.stdin) if d['block_device'] == sys.argv[1]][0])" "$1"; }
file_of() { ub list -n "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["file"])'; }
log_of() { ub list -n "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["log"])'; }
mnt_of() { ub list -n "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["mountpoint"])'; }

# Delete and check nothing is left: no daemon, no mount, no loop device, no state.
del_fuse() {
    local id=$1 pid mnt lo log
    pid=$(fuse_word "$id" 7)
    mnt=$(mnt_of "$id")
    lo=$(ub list -n "$id" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["loop_device"] or "")')
    log=$(log_of "$id")
    ub del -n "$id"
    wait_for 5 exited "$pid" || die "daemon $pid still running"
    # A device that worked logs no error, from the first request to the last.
    ! since_live "$id" "$log" | grep ERROR || die "daemon $pid logged an error ($log)"
    ! findmnt "$mnt" >/dev/null || die "$mnt still mounted"
    if [ -n "$lo" ]; then
        ! losetup -a | grep -q "^$lo:.*$mnt" || die "$lo still attached to $mnt"
    fi
    [ ! -e "$STATE/$id.json" ] || die "state file left behind"
}

# The lines of log file $2 from device $1's last start on (the log of an id
# is appended to by every daemon that had it).
since_live() { awk -v m="device $1 live at" 'index($0, m) { buf = "" } { buf = buf $0 "\n" } END { printf "%s", buf }' "$2"; }

# userblk's FUSE mounts have source "userblk" and type fuse or fuse.userblk.
no_fuse_mounts() { ! grep -E '^userblk [^ ]+ fuse(\.userblk)? ' /proc/self/mounts || die "a userblk FUSE mount is left"; }

# KiB of memory the mem target's memfd holds in daemon PID.
mem_kb() {
    local fd
    for fd in /proc/"$1"/fd/*; do
        case "$(readlink "$fd")" in /memfd:*)
            echo $(( $(stat -L -c %b "$fd") / 2 )); return ;;
        esac
    done
    echo "no memfd in daemon $1" >&2; return 1
}

# ---- cases --------------------------------------------------------------------

case_auto_mem_ext4() {
    needs_fallback
    local out id blk sum
    out=$(ub add mem --size 1G)
    echo "$out"
    grep -q "frontend fuse block /dev/loop" <<<"$out" || die "auto did not fall back to FUSE + loop"
    id=$(dev_id_of "$out")
    blk=$(sed -n 's/.*frontend fuse block \([^ ]*\).*/\1/p' <<<"$out")
    [ -b "$blk" ] || die "$blk is not a block device"
    [ "$(blockdev --getsize64 "$blk")" = $((1 << 30)) ] || die "wrong size"
    [ "$(cat "/sys/block/${blk#/dev/}/loop/dio")" = 1 ] || die "loop device without direct I/O"
    mkfs.ext4 -q -F "$blk"
    mount "$blk" "$MNT"
    dd if=/dev/urandom of="$MNT/blob" bs=1M count=32 status=none
    mkdir "$MNT/dir"; for i in $(seq 1 100); do echo "file $i" >"$MNT/dir/f$i"; done
    sum=$(sha256sum <"$MNT/blob")
    umount "$MNT"
    fsck.ext4 -n -f "$blk"
    mount "$blk" "$MNT"
    [ "$(sha256sum <"$MNT/blob")" = "$sum" ] || die "blob changed across umount/mount"
    [ "$(cat "$MNT/dir/f77")" = "file 77" ] || die "small file lost"
    umount "$MNT"
    del_fuse "$id"
}

case_auto_says_fallback_and_show_prints_the_path() {
    needs_fallback
    local out id
    # --show: stdout is the device's path alone; the fallback is one line on stderr.
    out=$(ub add --show mem --size 16M 2>"$WORK/said") || die "add failed: $(cat "$WORK/said")"
    [[ "$out" =~ ^/dev/loop[0-9]+$ ]] || die "--show printed '$out'"
    [ -b "$out" ] || die "$out is not a block device"
    [ "$(wc -l <"$WORK/said")" = 1 ] || die "not one line on stderr: $(cat "$WORK/said")"
    grep -q "^userblk: no ublk driver (modprobe ublk_drv); serving $out through FUSE + loop$" "$WORK/said" \
        || die "no fallback note: $(cat "$WORK/said")"
    id=$(id_of_block "$out")
    del_fuse "$id"
    # Asked for FUSE: no note; --show prints the file.
    out=$(ub add --show --frontend fuse mem --size 16M 2>"$WORK/said") || die "add failed: $(cat "$WORK/said")"
    [[ "$out" == */disk ]] && [ -f "$out" ] || die "--show printed '$out'"
    [ ! -s "$WORK/said" ] || die "stderr not empty: $(cat "$WORK/said")"
    id=$(id_of_block "$out")
    del_fuse "$id"
}

case_fio_verify_loop() {
    needs_host
    local id blk
    read -r id blk < <(add_fuse mem --size 256M --frontend fuse --loop)
    "${FIO[@]}" --name=verify --filename="$blk" --ioengine=io_uring --direct=1 --rw=randwrite \
        --bsrange=4k-256k --iodepth=32 --size=100% --verify=crc32c --verify_fatal=1 --do_verify=1
    "${FIO[@]}" --name=randrw --filename="$blk" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k \
        --iodepth=32 --size=100% --io_size=64M --verify=crc32c --verify_fatal=1
    del_fuse "$id"
}

case_fio_verify_fuse_file_direct() {
    needs_host
    local id file
    read -r id file < <(add_fuse mem --size 256M --frontend fuse)
    [ -f "$file" ] || die "without --loop the block path is the file: $file"
    "${FIO[@]}" --name=verify --filename="$file" --ioengine=io_uring --direct=1 --rw=randwrite \
        --bsrange=4k-256k --iodepth=32 --size=100% --verify=crc32c --verify_fatal=1 --do_verify=1
    # Four threads at once, each on its own quarter (so each can verify what it wrote).
    "${FIO[@]}" --name=randrw --filename="$file" --ioengine=psync --numjobs=4 --direct=1 --rw=randrw \
        --bs=4k --size=64M --offset_increment=64M --io_size=16M --verify=crc32c --verify_fatal=1
    del_fuse "$id"
}

# The early target answers writes before a worker stores them: the FUSE
# threads' slot machine must hold each answer until the store is done.
case_early_answers_held() {
    needs_host
    local id blk
    read -r id blk < <(add_fuse early --size 128M --frontend fuse --loop -q 2)
    "${FIO[@]}" --name=early --filename="$blk" --ioengine=io_uring --direct=1 --rw=randwrite \
        --bsrange=4k-128k --iodepth=32 --numjobs=2 --size=64M --offset_increment=64M --io_size=64M \
        --verify=crc32c --verify_fatal=1 --verify_backlog=32 --do_verify=1
    del_fuse "$id"
}

case_blkdiscard_frees_memory() {
    needs_host
    local id blk pid before after
    read -r id blk < <(add_fuse mem --size 256M --frontend fuse --loop)
    pid=$(fuse_word "$id" 7)
    dd if=/dev/urandom of="$blk" bs=1M count=128 oflag=direct status=none
    before=$(mem_kb "$pid")
    [ "$before" -ge $((120 * 1024)) ] || die "128 MiB written but daemon holds only ${before} KiB"
    blkdiscard -o 0 -l 96M "$blk"
    after=$(mem_kb "$pid")
    echo "note: daemon memory ${before} KiB -> ${after} KiB after discarding 96 MiB"
    [ "$after" -le $((before - 90 * 1024)) ] || die "discard freed too little: $before -> $after KiB"
    cmp -n $((96 << 20)) "$blk" /dev/zero || die "discarded range does not read as zeroes"
    ! cmp -s -i $((96 << 20)):0 -n 4096 "$blk" /dev/zero || die "data after the discarded range was lost"
    blkdiscard -z -o 100M -l 1M "$blk"
    cmp -i $((100 << 20)):0 -n $((1 << 20)) "$blk" /dev/zero || die "write-zeroes range does not read as zeroes"
    del_fuse "$id"
}

case_file_target_byte_for_byte() {
    needs_host
    local id blk img="$WORK/backing.img"
    rm -f "$img"; truncate -s 64M "$img"
    read -r id blk < <(add_fuse file -f "$img" --frontend fuse --loop)
    dd if=/dev/urandom of="$WORK/data" bs=1M count=64 status=none
    dd if="$WORK/data" of="$blk" bs=1M oflag=direct status=none
    blockdev --flushbufs "$blk"
    cmp "$WORK/data" "$img" || die "backing file differs from what was written to $blk"
    # And the other way: what is in the file is what the device reads.
    dd if=/dev/urandom of="$img" bs=4k count=1 seek=100 conv=notrunc oflag=direct status=none
    cmp <(dd if="$blk" bs=4k skip=100 count=1 iflag=direct status=none) \
        <(dd if="$img" bs=4k skip=100 count=1 status=none) || die "device does not read the file's data"
    del_fuse "$id"
}

case_del_refuses_while_mounted() {
    needs_host
    local id blk pid
    read -r id blk < <(add_fuse mem --size 64M --frontend fuse --loop)
    pid=$(fuse_word "$id" 7)
    mkfs.ext4 -q -F "$blk"
    mount "$blk" "$MNT"
    expect_fail "unmount it first" ub del -n "$id"
    grep -q "$MNT" <<<"$(ub del -n "$id" 2>&1)" || die "the refusal does not say where it is mounted"
    # A stray SIGTERM is refused too while it is mounted: the file system keeps working.
    kill -TERM "$pid"; sleep 0.5
    kill -0 "$pid" || die "daemon stopped under a mounted file system"
    echo data >"$MNT/f"; sync
    umount "$MNT"
    del_fuse "$id"
}

stdin_is() { [ "$(readlink "/proc/$1/fd/0" 2>/dev/null)" = "$2" ]; }

case_del_refuses_while_file_open() {
    needs_host
    local id file holder
    read -r id file < <(add_fuse mem --size 64M --frontend fuse)
    sleep 60 <"$file" &
    holder=$!
    wait_for 5 stdin_is "$holder" "$file" || die "the holder did not open $file"
    expect_fail "open by pid $holder" ub del -n "$id"
    kill "$holder"; wait "$holder" 2>/dev/null || true
    del_fuse "$id"
}

case_dead_daemon_cleanup() {
    needs_host
    local id blk pid mnt
    read -r id blk < <(add_fuse mem --size 64M --frontend fuse --loop)
    pid=$(fuse_word "$id" 7)
    mnt=$(mnt_of "$id")
    kill -KILL "$pid"
    wait_for 5 exited "$pid"
    [ "$(fuse_word "$id" 11)" = DEAD ] || die "list does not show the dead daemon"
    ub del -n "$id"
    ! findmnt "$mnt" >/dev/null || die "$mnt still mounted after del"
    ! losetup -a | grep -q "$mnt" || die "loop device still attached"
    [ ! -e "$STATE/$id.json" ] || die "state left behind"
}

case_fsync_reaches_daemon() {
    # fio --fsync=1 through the loop device: the kernel turns each fsync into
    # a flush of the loop device, which must reach the FUSE file as fsync.
    # The counting target in crates/userblk/tests/fuse.rs proves the last hop;
    # here we check the path end to end on the counters the daemon logs as it stops.
    needs_host
    local id blk log
    read -r id blk < <(add_fuse mem --size 64M --frontend fuse --loop)
    log=$(log_of "$id")
    "${FIO[@]}" --name=fsync --filename="$blk" --ioengine=psync --rw=randwrite --bs=4k --size=4M \
        --fsync=1 --io_size=1M
    del_fuse "$id"
    local n
    n=$(sed -n 's/.* \([0-9]*\) flushes.*/\1/p' "$log" | tail -n 1)
    [ -n "$n" ] || die "no request counts in $log"
    echo "note: $n fsyncs reached the daemon for 256 fio writes with --fsync=1"
    [ "$n" -ge 256 ] || die "only $n of 256 fsyncs reached the daemon"
}

case_list_shows_every_frontend() {
    needs_host
    local a b json
    read -r a _ < <(add_fuse mem --size 16M --frontend fuse)
    read -r b _ < <(add_fuse null --size 16M --frontend fuse --loop)
    json=$(ub list --json)
    LIST_JSON=$json python3 - "$a" "$b" <<'EOF' || die "list --json is missing fields"
import json, os, sys
devs = {d["id"]: d for d in json.loads(os.environ["LIST_JSON"])}
a, b = int(sys.argv[1]), int(sys.argv[2])
assert devs[a]["frontend"] == "fuse" and devs[a]["state"] == "LIVE", devs[a]
assert devs[a]["block_device"].endswith("/disk") and devs[a]["loop_device"] is None, devs[a]
assert devs[b]["block_device"].startswith("/dev/loop"), devs[b]
assert devs[b]["size"] == 16 << 20 and devs[b]["target"]["type"] == "null", devs[b]
EOF
    ub list | grep -q "^dev id $a: frontend fuse" || die "text list misses device $a"
    del_fuse "$a"
    del_fuse "$b"
}

case_errors_are_one_clear_line() {
    needs_host
    # Mount point missing, not a directory, busy.
    expect_fail "/nonexistent/ub" ub add mem --size 16M --frontend fuse --mountpoint /nonexistent/ub
    : >"$WORK/plainfile"
    expect_fail "not a directory" ub add mem --size 16M --frontend fuse --mountpoint "$WORK/plainfile"
    mkdir -p "$WORK/busy"; mount -t tmpfs none "$WORK/busy"
    expect_fail "busy" ub add mem --size 16M --frontend fuse --mountpoint "$WORK/busy"
    umount "$WORK/busy"
    # FUSE-only options on ublk, recovery on FUSE.
    expect_fail "FUSE options" ub add mem --size 16M --frontend ublk --loop
    expect_fail "needs the ublk frontend" ub add mem --size 16M --frontend fuse -r
    no_fuse_mounts
    [ -z "$(ls $STATE/*.json 2>/dev/null)" ] || die "state left behind: $(ls "$STATE")"
}

case_no_fuse_no_loop_support() {
    needs_host
    # A mount namespace whose /dev lacks the device nodes stands in for a
    # kernel without FUSE or loop.
    local b="mknod -m 666 /dev/null c 1 3 && exec $USERBLK"
    expect_fail "/dev/fuse not found" unshare -m sh -c \
        "mount -t tmpfs none /dev && $b add mem --size 16M --frontend fuse"
    expect_fail "/dev/fuse not found" unshare -m sh -c \
        "mount -t tmpfs none /dev && $b add mem --size 16M"
    expect_fail "loop-control" unshare -m sh -c \
        "mount -t tmpfs none /dev && mknod /dev/fuse c 10 229 && $b add mem --size 16M --frontend fuse --loop"
    no_fuse_mounts
}

case_user_without_fusermount_or_root() {
    needs_host
    local dir=$WORK/user
    mkdir -p "$dir/mnt"; chown -R 65534:65534 "$dir"
    as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups env USERBLK_STATE_DIR="$dir/state" "$@"; }
    expect_fail "needs root" as_nobody "$USERBLK" add mem --size 16M --frontend fuse --loop --mountpoint "$dir/mnt"
    expect_fail "fusermount3 not found" as_nobody env PATH=/nonexistent "$USERBLK" add mem --size 16M \
        --frontend fuse --mountpoint "$dir/mnt"
    no_fuse_mounts
}

case_user_mounts_with_fusermount() {
    needs_host
    command -v fusermount3 >/dev/null || skip "fusermount3 not installed (package fuse3)"
    local dir=$WORK/user2 prefix=""
    mkdir -p "$dir/mnt"; chown -R 65534:65534 "$dir"
    local as="setpriv --reuid=65534 --regid=65534 --clear-groups env USERBLK_STATE_DIR=$dir/state"
    if ! $as sh -c 'test -r /dev/fuse && test -w /dev/fuse'; then
        # fusermount3 opens /dev/fuse as the user: say so clearly, then go on
        # with a 0666 copy of the node in a private mount namespace.
        expect_fail "users need it readable and writable" $as "$USERBLK" add mem --size 16M \
            --frontend fuse --mountpoint "$dir/mnt"
        echo "note: /dev/fuse is closed to users here; ran with a 0666 copy in a private mount namespace"
        prefix="mknod -m 666 $dir/fuse c 10 229 && mount --bind $dir/fuse /dev/fuse &&"
    fi
    unshare -m sh -ec "$prefix
        $as $USERBLK add mem --size 16M --mountpoint $dir/mnt --frontend fuse
        $as dd if=/dev/urandom of=$dir/data bs=1M count=4 status=none
        $as dd if=$dir/data of=$dir/mnt/disk bs=1M conv=notrunc,fsync status=none
        $as cmp -n $((4 << 20)) $dir/data $dir/mnt/disk
        $as $USERBLK list | grep -q 'frontend fuse block $dir/mnt/disk'
        $as $USERBLK del -a
        ! grep -q ' $dir/mnt ' /proc/self/mounts"
}

# Nothing of a failed add on mount point $1 is left, and the loop subsystem
# still answers. (Other devices may exist: only this mount point's count.)
nothing_left() {
    local mnt=$1 i
    for i in $(seq 50); do  # the attacher lets go of its device within moments
        losetup -a | grep -q "$mnt/" || break
        sleep 0.2
    done
    timeout 10 losetup -f >/dev/null || die "losetup -f hangs or fails: the loop subsystem is stuck"
    ! losetup -a | grep "$mnt/" || die "a loop device is still bound to $mnt/disk"
    ! grep -q " $mnt " /proc/self/mounts || die "$mnt is still mounted"
    ! timeout 10 "$USERBLK" list | grep -q "$mnt/" || die "add left a list entry"
    ! grep -ls "$mnt" $STATE/*.json || die "a state file is left"
}

case_kill_during_loop_attach() {
    needs_fallback
    local out rc pid
    mkdir -p "$WORK/kill"
    timeout 60 "$USERBLK" add mem --size 64M --mountpoint "$WORK/kill" --filter delay:flush=10s >"$WORK/add.out" 2>&1 &
    local add=$!
    for _ in $(seq 50); do
        # No daemon yet is no match: not a failure under pipefail.
        pid=$(pgrep -f -- "$WORK/kill --filter delay:flush=10s --foreground" | head -1 || true)
        [ -n "$pid" ] && pgrep -P "$pid" >/dev/null && break
        sleep 0.1
    done
    [ -n "$pid" ] || die "no daemon"
    sleep 1
    kill -9 "$pid"
    rc=0; wait "$add" || rc=$?
    [ "$rc" != 0 ] && [ "$rc" != 124 ] || die "add returned $rc: $(cat "$WORK/add.out")"
    grep -q "signal: 9" "$WORK/add.out" || die "add did not say the daemon was killed: $(cat "$WORK/add.out")"
    nothing_left "$WORK/kill"
}

case_stuck_flush_add_fails() {
    needs_fallback
    local rc=0
    mkdir -p "$WORK/stuck"
    timeout 60 "$USERBLK" add mem --size 64M --mountpoint "$WORK/stuck" --filter delay:all=1000000s >"$WORK/add.out" 2>&1 || rc=$?
    [ "$rc" != 0 ] && [ "$rc" != 124 ] || die "add returned $rc: $(cat "$WORK/add.out")"
    grep -q "did not answer the flush" "$WORK/add.out" || die "unclear error: $(cat "$WORK/add.out")"
    nothing_left "$WORK/stuck"
}

case_del_force_stopped_daemon() {
    needs_fallback
    local r id pid out
    mkdir -p "$WORK/force"
    r=$(add_fuse mem --size 64M --mountpoint "$WORK/force") || die "add failed"
    id=${r%% *}
    pid=$(fuse_word "$id" 7)
    kill -STOP "$pid"
    out=$(timeout 30 "$USERBLK" del -n "$id" 2>&1) && die "del of a stopped daemon succeeded"
    [ "$(wc -l <<<"$out")" = 1 ] || die "not one line: $out"
    grep -q -- "--force" <<<"$out" || die "del did not name --force: $out"
    timeout 30 "$USERBLK" del -n "$id" --force || die "del --force failed"
    wait_for 5 exited "$pid" || die "daemon $pid still running"
    nothing_left "$WORK/force"
}

# A process waiting on the file gets a signal: the kernel sends FUSE_INTERRUPT,
# which another thread (another /dev/fuse clone) reads and answers after the
# request itself was answered. That harmless refused reply is no ERROR.
case_signal_while_waiting_no_error() {
    needs_host
    local id file p log
    read -r id file < <(add_fuse mem --size 16M --frontend fuse -q 2 --filter delay:flush=500ms)
    log=$(log_of "$id")
    dd if=/dev/zero of="$file" bs=4k count=1 conv=notrunc,fsync status=none &
    p=$!
    sleep 0.2
    kill -USR1 "$p"  # dd reports progress on SIGUSR1 and goes on
    wait "$p" || die "dd failed"
    del_fuse "$id"
    since_live "$id" "$log" | grep -q "1 writes, 1 flushes" || die "the fsync did not reach the daemon: $(cat "$log")"
}

# Idle serving threads cost little: their receive buffers are touched only
# as requests fill them (64 threads took 208 MB when glibc's heap zeroed them).
case_idle_threads_cost_little() {
    needs_host
    local id file pid rss
    read -r id file < <(add_fuse null --size 16M --frontend fuse -q 64)
    pid=$(fuse_word "$id" 7)
    rss=$(ps -o rss= -p "$pid")
    echo "note: a FUSE daemon with 64 idle threads has ${rss} KiB resident"
    [ "$rss" -lt $((48 * 1024)) ] || die "64 idle threads hold ${rss} KiB"
    del_fuse "$id"
}

# `ctl` on a stopped daemon: no acknowledgement comes, so it fails within
# seconds (not the 180 s a long action may take), naming the pid and --force.
case_ctl_stopped_daemon() {
    needs_host
    local id file pid out rc=0 t0
    read -r id file < <(add_fuse null --size 16M --frontend fuse --filter flakey)
    pid=$(fuse_word "$id" 7)
    ub ctl -n "$id" | grep -q powercut || die "ctl lists no powercut"
    kill -STOP "$pid"
    t0=$SECONDS
    out=$(timeout 60 "$USERBLK" ctl -n "$id" powercut 2>&1) || rc=$?
    kill -CONT "$pid"
    echo "ctl said (after $((SECONDS - t0)) s): $out"
    [ "$rc" = 1 ] || die "ctl exited $rc"
    [ $((SECONDS - t0)) -lt 10 ] || die "ctl took $((SECONDS - t0)) s"
    [ "$(wc -l <<<"$out")" = 1 ] || die "not one line: $out"
    grep -q "pid $pid" <<<"$out" && grep -q -- "del -n $id --force" <<<"$out" || die "unclear: $out"
    del_fuse "$id"
}

# del --force unmounts lazily what is mounted on the loop device, one line
# each, then deletes as usual; plain del refuses, naming the mount point.
case_del_force_unmounts_the_loop_device() {
    needs_host
    local id blk pid out holder file
    read -r id blk < <(add_fuse mem --size 64M --frontend fuse --loop)
    pid=$(fuse_word "$id" 7)
    file=$(file_of "$id")
    mkfs.ext4 -q -F "$blk"
    mount "$blk" "$MNT"
    expect_fail "$MNT" ub del -n "$id"
    out=$(ub del -n "$id" --force 2>&1) || die "del --force failed: $out"
    [ "$out" = "userblk: device $id: unmounted $MNT from $blk lazily (--force)" ] || die "said: $out"
    ! findmnt "$MNT" >/dev/null || die "$MNT still mounted"
    wait_for 5 exited "$pid" || die "daemon $pid still running"
    wait_for 5 not_bound "$blk" "$file" || die "$blk still bound"
    [ ! -e "$STATE/$id.json" ] || die "state file left behind"
    # A file still open on it: the device goes when that file is closed.
    read -r id blk < <(add_fuse mem --size 64M --frontend fuse --loop)
    file=$(file_of "$id")
    mkfs.ext4 -q -F "$blk"
    mount "$blk" "$MNT"
    touch "$MNT/f"; sleep 60 <"$MNT/f" &
    holder=$!
    wait_for 5 stdin_is "$holder" "$MNT/f" || die "the holder did not open $MNT/f"
    out=$(ub del -n "$id" --force 2>&1) || die "del --force failed: $out"
    grep -q "unmounted $MNT from $blk lazily" <<<"$out" || die "said: $out"
    grep -q "at its last close" <<<"$out" || die "said: $out"
    [ ! -e "$STATE/$id.json" ] || die "state file left behind"
    kill "$holder"; wait "$holder" 2>/dev/null || true
    wait_for 10 not_bound "$blk" "$file" || die "$blk still bound after its last user went"
}
# Whether loop device $1 no longer has file $2 behind it (others may reuse the number).
not_bound() { ! losetup "$1" 2>/dev/null | grep -qF "$2"; }

# Safe stop: a loop device a process has open (not mounted, not O_EXCL) is
# refused naming the pid; --force stops it anyway and leaves nothing behind.
case_del_refuses_open_loop_device_force_works() {
    needs_host
    local id blk pid holder mnt lo
    mkdir -p "$WORK/open-lo"
    read -r id blk < <(add_fuse mem --size 64M --frontend fuse --loop --mountpoint "$WORK/open-lo")
    pid=$(fuse_word "$id" 7)
    lo=${blk#/dev/}
    sleep 60 <"$blk" &
    holder=$!
    wait_for 5 stdin_is "$holder" "$blk" || die "the holder did not open $blk"
    expect_fail "$lo is open by pid $holder (sleep)" ub del -n "$id"
    kill -0 "$pid" || die "a refused del stopped the daemon"
    dd if="$blk" of=/dev/null bs=4k count=1 iflag=direct status=none || die "a refused del broke the device"
    ub del -n "$id" --force || die "del --force failed"
    wait_for 5 exited "$pid" || die "daemon $pid still running"
    kill "$holder"; wait "$holder" 2>/dev/null || true
    nothing_left "$WORK/open-lo"
}

# Safe stop: del --force of a mounted loop device stops the daemon; the
# loop device detaches itself once the file system on it is unmounted.
case_del_force_mounted_loop_device() {
    needs_host
    local id blk pid mnt=$WORK/mnt-force
    mkdir -p "$WORK/mounted-lo" "$mnt"
    read -r id blk < <(add_fuse mem --size 64M --frontend fuse --loop --mountpoint "$WORK/mounted-lo")
    pid=$(fuse_word "$id" 7)
    mkfs.ext4 -q -F "$blk"
    mount "$blk" "$mnt"
    expect_fail "${blk#/dev/} is mounted on $mnt" ub del -n "$id"
    ub del -n "$id" --force || die "del --force failed"
    wait_for 5 exited "$pid" || die "daemon $pid still running"
    umount -l "$mnt" 2>/dev/null || true
    nothing_left "$WORK/mounted-lo"
}

# ---- run ----------------------------------------------------------------------

cleanup_all() {
    umount "$MNT" 2>/dev/null || true
    ub del -a >/dev/null 2>&1 || true
}
trap 'cleanup_all; rm -rf "$WORK"' EXIT

plan 25
case_run "auto: mem 1G is FUSE + loop, ext4 survives remount" case_auto_mem_ext4
case_run "auto: the fallback said in one line; --show prints only the path" case_auto_says_fallback_and_show_prints_the_path
case_run "fio verify on the loop device" case_fio_verify_loop
case_run "fio verify on the FUSE file, O_DIRECT" case_fio_verify_fuse_file_direct
case_run "early-answering target: answers held until stored (fio verify)" case_early_answers_held
case_run "blkdiscard frees mem and reads zeroes" case_blkdiscard_frees_memory
case_run "file target: backing file byte for byte" case_file_target_byte_for_byte
case_run "fio --fsync=1 reaches the daemon" case_fsync_reaches_daemon
case_run "del refuses while a fs is mounted" case_del_refuses_while_mounted
case_run "del refuses while the file is open" case_del_refuses_while_file_open
case_run "dead daemon: list says DEAD, del cleans up" case_dead_daemon_cleanup
case_run "list shows FUSE devices with details" case_list_shows_every_frontend
case_run "bad mount points and options: clear errors" case_errors_are_one_clear_line
case_run "no FUSE / no loop support: clear errors" case_no_fuse_no_loop_support
case_run "user: no fusermount3, no loop: clear errors" case_user_without_fusermount_or_root
case_run "user: FUSE mount through fusermount3" case_user_mounts_with_fusermount
case_run "kill -9 while attaching the loop device: add fails, nothing stuck" case_kill_during_loop_attach
case_run "a target that never flushes: add fails within its deadline" case_stuck_flush_add_fails
case_run "del --force on a stopped daemon; plain del names --force" case_del_force_stopped_daemon
case_run "a signal while waiting on the FUSE file: no ERROR in the log" case_signal_while_waiting_no_error
case_run "64 idle FUSE threads cost little memory" case_idle_threads_cost_little
case_run "ctl on a stopped daemon fails within seconds, naming del --force" case_ctl_stopped_daemon
case_run "del --force unmounts the loop device's file systems lazily" case_del_force_unmounts_the_loop_device
case_run "del refuses an open loop device naming the pid; --force works" case_del_refuses_open_loop_device_force_works
case_run "del --force of a mounted loop device; nothing left after umount" case_del_force_mounted_loop_device
summary
