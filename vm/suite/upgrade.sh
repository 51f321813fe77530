#!/usr/bin/env bash
# Real-kernel suite for `userblk upgrade`: a live device handed to a new
# daemon with no I/O error. QUIESCE (Linux 6.16+) where the kernel has it;
# kill + recover with --reissue on older kernels, and refusals elsewhere.
# Runs inside the VM (vm/run.sh), as root, from the repository root.
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
WORK=/run/upgrade-suite
mkdir -p "$WORK"
MNT=/mnt/ub-upgrade

state_is() { [ "$(list_word "$1" 11)" = "$2" ]; }
has_quiesce() { ub features | grep -qw QUIESCE; }
# What makes a device upgradable on this kernel: -r with QUIESCE, else --reissue.
if has_quiesce; then UPG=-r; else UPG=--reissue; fi

# Upgrade device ID (extra args to `upgrade` after it) and check the
# handover: a new pid, the old one gone, LIVE. Prints the milliseconds taken.
upgrade_once() { # upgrade_once ID [ARGS...]
    local id=$1 old new start end quiesced; shift
    old=$(list_word "$id" 7)
    quiesced=$(grep -c "quiesced for a new daemon" "/run/userblk/$id.log" || true)
    start=$(date +%s%N)
    ub upgrade -n "$id" "$@" >"$WORK/upgrade.out" 2>&1 || { cat "$WORK/upgrade.out"; die "upgrade of device $id failed"; }
    end=$(date +%s%N)
    grep -q "daemon $old handed over to daemon" "$WORK/upgrade.out" || { cat "$WORK/upgrade.out"; die "upgrade did not say it handed over"; }
    state_is "$id" LIVE || die "device $id not LIVE after upgrade"
    new=$(list_word "$id" 7)
    [ "$new" != "$old" ] || die "upgrade kept daemon $old"
    exited "$old" || die "old daemon $old still runs"
    # Where the kernel has QUIESCE the old daemon quiesced (its log says so), not killed.
    if has_quiesce; then
        [ "$(grep -c "quiesced for a new daemon" "/run/userblk/$id.log")" -gt "$quiesced" ] || die "the old daemon did not log a quiesce"
    fi
    echo $(((end - start) / 1000000))
}

# fio verify (random 4k writes, time based) in the background, as FIO.
fio_verify_bg() { # fio_verify_bg FILE SIZE DEPTH RUNTIME
    fio --ioengine=io_uring --direct=1 --name=upgrade --filename="$1" --size="$2" \
        --rw=randwrite --bs=4k --iodepth="$3" --time_based --runtime="$4" \
        --verify=crc32c --verify_backlog=256 --verify_fatal=1 --verify_state_save=0 --randrepeat=0 \
        --output-format=json --output="$WORK/fio.json" >/dev/null 2>&1 &
    FIO=$!
}

# fio verify on a file of ext4 on the device.
start_fio() { # start_fio RUNTIME
    fio_verify_bg "$MNT/fio.dat" 32M 8 "$1"
}

# fio's exit status and its JSON: no error, writes done, verified.
check_fio() {
    local rc=0
    wait "$FIO" || rc=$?
    [ "$rc" = 0 ] || { tail -n 30 "$WORK/fio.json"; die "fio failed (exit $rc) across the upgrades"; }
    fio_report
}

# fio's JSON report: no error, writes done. fio writes its "terminating on
# signal" line into the output file ahead of the JSON.
fio_report() {
    python3 - "$WORK/fio.json" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
assert job["error"] == 0, f"fio error {job['error']}"
w = job["write"]
assert w["total_ios"] > 0, "no writes"
print(f"note: fio: {w['total_ios']} writes, 0 errors, max write latency {w['clat_ns']['max'] / 1e6:.0f} ms")
EOF
}

# ROUNDS upgrades of a mem device (ADD-ARGS) carrying a mounted ext4 under
# fio verify; fsck clean at the end.
upgrades_under_fio() { # upgrades_under_fio ROUNDS ADD-ARGS...
    local rounds=$1 id times=() ms; shift
    id=$(add_dev "$@" mem --size 256M)
    mkfs.ext4 -q -F "/dev/ublkb$id"
    mkdir -p "$MNT"
    mount "/dev/ublkb$id" "$MNT"
    start_fio $((rounds * 12 + 20))
    sleep 3
    for _ in $(seq 1 "$rounds"); do
        kill -0 "$FIO" 2>/dev/null || die "fio ended before the upgrades did"
        ms=$(upgrade_once "$id")
        times+=("$ms")
        mountpoint -q "$MNT" || die "$MNT no longer mounted"
        sleep 1
    done
    kill -0 "$FIO" 2>/dev/null || die "fio ended before the upgrades did"
    check_fio
    echo "note: $rounds upgrades took ${times[*]} ms"
    umount "$MNT"
    fsck.ext4 -n -f "/dev/ublkb$id"
    del_dev "$id"
}

# The hang hunt: ROUNDS upgrades back to back (no pause) of a mem device
# (ADD-ARGS) under fio verify at depth 32 on the raw device, each with a
# deadline, so an upgrade that hangs fails the case and shows the device
# instead of stalling the suite.
upgrades_back_to_back() { # upgrades_back_to_back ROUNDS ADD-ARGS...
    local rounds=$1 id i old rc=0; shift
    id=$(add_dev "$@" mem --size 128M)
    fio_verify_bg "/dev/ublkb$id" 64M 32 900
    sleep 2
    for i in $(seq 1 "$rounds"); do
        kill -0 "$FIO" 2>/dev/null || die "fio ended before upgrade $i"
        old=$(list_word "$id" 7)
        rc=0
        timeout 150 "$USERBLK" upgrade -n "$id" >"$WORK/upgrade.out" 2>&1 || rc=$?
        if [ "$rc" != 0 ]; then
            cat "$WORK/upgrade.out"
            ub list -n "$id" || true
            [ "$rc" != 124 ] || die "upgrade $i of $rounds hung (no end within 150 s)"
            die "upgrade $i of $rounds failed (exit $rc)"
        fi
        state_is "$id" LIVE || die "device $id not LIVE after upgrade $i"
        [ "$(list_word "$id" 7)" != "$old" ] || die "upgrade $i kept daemon $old"
        exited "$old" || die "upgrade $i: old daemon $old still runs"
    done
    kill -0 "$FIO" 2>/dev/null || die "fio ended before the upgrades did"
    # SIGINT ends a time-based fio with its report (exit 0, or 128 for the signal).
    kill -INT "$FIO"
    rc=0
    wait "$FIO" || rc=$?
    case "$rc" in 0|128|130) ;; *) tail -n 30 "$WORK/fio.json"; die "fio failed (exit $rc) across the upgrades" ;; esac
    fio_report
    echo "note: $rounds upgrades back to back under fio at depth 32"
    del_dev "$id"
}

with_binary_copy() {
    local id new
    mkdir -p "$WORK/bin"
    cp "$USERBLK" "$WORK/bin/userblk"
    id=$(add_dev $UPG mem --size 16M)
    printf 'kept' | dd of="/dev/ublkb$id" oflag=direct,sync bs=512 conv=sync status=none
    upgrade_once "$id" --binary "$WORK/bin/userblk" >/dev/null
    new=$(list_word "$id" 7)
    [ "$(readlink "/proc/$new/exe")" = "$WORK/bin/userblk" ] || die "the new daemon runs $(readlink "/proc/$new/exe"), not the copy"
    [ "$(head -c 4 "/dev/ublkb$id")" = kept ] || die "data lost across the upgrade"
    # And back to the binary under test.
    upgrade_once "$id" >/dev/null
    del_dev "$id"
}

# Refusals say one line, exit non-zero and leave the device served by its daemon.
still_served_by() { # still_served_by ID PID
    state_is "$1" LIVE || die "device $1 not LIVE after a refused upgrade"
    [ "$(list_word "$1" 7)" = "$2" ] || die "device $1 changed daemon on a refused upgrade"
    dd if="/dev/ublkb$1" of=/dev/null bs=4k count=1 iflag=direct status=none || die "device $1 does not serve I/O"
}

one_line_fail() { # one_line_fail PHRASE CMD...
    local phrase=$1 out rc=0; shift
    # stderr only: a daemon started after all prints its device on stdout.
    out=$("$@" 2>&1 >/dev/null) || rc=$?
    echo "\$ $* -> exit $rc: $out"
    [ "$rc" -ne 0 ] || die "expected failure from: $*"
    [ "$(wc -l <<<"$out")" = 1 ] || die "not one line: $out"
    grep -qi -- "$phrase" <<<"$out" || die "'$*' does not mention '$phrase': $out"
}

bad_input() {
    local id pid nbd
    one_line_fail "no ublk device with id 77" ub upgrade -n 77
    id=$(add_dev $UPG mem --size 16M)
    pid=$(list_word "$id" 7)
    one_line_fail "must be named userblk" ub upgrade -n "$id" --binary /bin/true
    one_line_fail "No such file" ub upgrade -n "$id" --binary "$WORK/nothing/userblk"
    mkdir -p "$WORK/fake"
    printf '#!/bin/sh\necho hello\n' >"$WORK/fake/userblk"
    chmod 755 "$WORK/fake/userblk"
    one_line_fail "not a userblk binary" ub upgrade -n "$id" --binary "$WORK/fake/userblk"
    still_served_by "$id" "$pid"
    # Not a ublk device: an NBD export has no kernel device to hand over.
    nbd=$(dev_id_of "$(ub add --listen "unix:$WORK/nbd.sock" null --size 16M)")
    [ -n "$nbd" ] || die "no NBD device"
    one_line_fail "only ublk devices" ub upgrade -n "$nbd"
    ub del -n "$nbd"
    still_served_by "$id" "$pid"
    del_dev "$id"
}

without_r_refused() {
    local id pid
    id=$(add_dev mem --size 16M)
    pid=$(list_word "$id" 7)
    one_line_fail "added without -r" ub upgrade -n "$id"
    still_served_by "$id" "$pid"
    del_dev "$id"
}

r_without_reissue_refused() {
    has_quiesce && skip "this kernel has QUIESCE: a -r device upgrades (the 6.12 VM runs this case)"
    local id pid
    id=$(add_dev -r mem --size 16M)
    pid=$(list_word "$id" 7)
    one_line_fail "add it with --reissue" ub upgrade -n "$id"
    still_served_by "$id" "$pid"
    del_dev "$id"
}

# The new binary fails to serve: the device is served again (by this
# binary), the command fails saying so, and the file system never noticed.
broken_new_binary() {
    local id old new
    mkdir -p "$WORK/broken"
    printf '#!/bin/sh\n[ "$1" = --version ] && { echo "userblk 99.0.0"; exit 0; }\necho "userblk: broken on purpose" >&2\nexit 1\n' >"$WORK/broken/userblk"
    chmod 755 "$WORK/broken/userblk"
    id=$(add_dev $UPG mem --size 64M)
    mkfs.ext4 -q -F "/dev/ublkb$id"
    mkdir -p "$MNT"
    mount "/dev/ublkb$id" "$MNT"
    echo data >"$MNT/f" && sync
    old=$(list_word "$id" 7)
    one_line_fail "broken on purpose" ub upgrade -n "$id" --binary "$WORK/broken/userblk" >"$WORK/broken.out"
    cat "$WORK/broken.out"
    grep -q "served by a new daemon of" "$WORK/broken.out" || die "a failed upgrade did not say who serves the device"
    state_is "$id" LIVE || die "device $id not LIVE after a failed upgrade"
    new=$(list_word "$id" 7)
    [ "$new" != "$old" ] && exited "$old" || die "no new daemon after the failed upgrade"
    [ "$(readlink "/proc/$new/exe")" = "$(readlink -f "$USERBLK")" ] || die "the device is served by $(readlink "/proc/$new/exe")"
    [ "$(cat "$MNT/f")" = data ] || die "file lost"
    umount "$MNT"
    fsck.ext4 -n -f "/dev/ublkb$id"
    del_dev "$id"
}

# --fail-io: I/O fails while no daemon runs, so no handover is hitless.
fail_io_refused() {
    ub features | grep -qw USER_RECOVERY_FAIL_IO || skip "this kernel lacks USER_RECOVERY_FAIL_IO (Linux 6.13+)"
    local id pid
    id=$(add_dev --fail-io mem --size 16M)
    pid=$(list_word "$id" 7)
    one_line_fail "added with --fail-io" ub upgrade -n "$id"
    still_served_by "$id" "$pid"
    del_dev "$id"
}

# Batch I/O devices: the kernel fails the requests that arrive while a
# batch device is quiesced, so upgrade refuses a -r batch device with that
# reason and hands a --reissue one over by kill + reissue.
batch_devices() {
    ub features | grep -qw BATCH_IO || skip "this kernel lacks BATCH_IO (Linux 7.0+)"
    local id pid
    id=$(add_dev -r --io-mode batch mem --size 16M)
    pid=$(list_word "$id" 7)
    one_line_fail "batch I/O" ub upgrade -n "$id"
    still_served_by "$id" "$pid"
    del_dev "$id"
    upgrades_back_to_back 2 --reissue --io-mode batch
}

# contrib/systemd's unit, as systemd runs it: the guest has no systemd, so
# its ExecStart= and ExecReload= lines run here as written (the binary
# path and ${USERBLK_ID} / $USERBLK_ARGS substituted as systemd does), with
# a Python datagram socket standing in for $NOTIFY_SOCKET. Checks what the
# service manager would see: READY=1, MAINPID= moving to the new daemon on
# reload (and the device living through it under fio), STOPPING=1 on the
# SIGTERM of `systemctl stop`.
unit_line() { sed -n "s/^$1=//p" contrib/systemd/userblk@.service; }
unit_argv() { # unit_argv KEY: the line's words, one per line
    local line
    line=$(unit_line "$1")
    [ -n "$line" ] || die "the unit has no $1="
    line=${line//\/usr\/local\/bin\/userblk/$USERBLK}
    # systemd: ${VAR} is one word, $VAR is split on white space (as bash does unquoted).
    ( eval "set -- $line"; printf '%s\n' "$@" )
}
systemd_unit_reload() {
    local sock=$WORK/notify.sock log=$WORK/notify.log listener main new want rc=0 start=() reload=()
    export USERBLK_ID=60 USERBLK_ARGS="$UPG mem --size 64M"
    mapfile -t start < <(unit_argv ExecStart)
    mapfile -t reload < <(unit_argv ExecReload)
    echo "ExecStart: ${start[*]}"
    echo "ExecReload: ${reload[*]}"
    [ "${start[0]}" = "$USERBLK" ] && [ "${reload[0]}" = "$USERBLK" ] || die "unexpected unit lines"
    rm -f "$sock" "$log"
    python3 - "$sock" "$log" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "a", buffering=1) as log:
    while True:
        msg = s.recv(4096).decode()
        log.write(msg.replace("\n", " ").strip() + "\n")
PY
    listener=$!
    wait_for 10 test -S "$sock" || die "no notify socket"
    NOTIFY_SOCKET=$sock "${start[@]}" >"$WORK/unit.out" 2>&1 &
    main=$!
    wait_for 60 grep -q 'READY=1' "$log" || { cat "$WORK/unit.out"; die "no READY=1 from ExecStart"; }
    state_is "$USERBLK_ID" LIVE || die "device $USERBLK_ID not LIVE"
    [ "$(list_word "$USERBLK_ID" 7)" = "$main" ] || die "ExecStart's process is not the daemon"
    fio_verify_bg "/dev/ublkb$USERBLK_ID" 32M 8 25
    sleep 3
    NOTIFY_SOCKET=$sock timeout 150 "${reload[@]}" || die "ExecReload failed"
    new=$(list_word "$USERBLK_ID" 7)
    [ "$new" != "$main" ] || die "reload kept daemon $main"
    state_is "$USERBLK_ID" LIVE || die "device not LIVE after reload"
    wait "$main" || rc=$?
    # It leaves by itself after a QUIESCE handover; kill + reissue kills it.
    if has_quiesce; then want=0; else want=137; fi
    [ "$rc" = "$want" ] || die "the old main process exited $rc after the reload, not $want"
    [ "$(grep -o 'MAINPID=[0-9]*' "$log" | tail -n 1)" = "MAINPID=$new" ] \
        || { cat "$log"; die "the service manager was not told MAINPID=$new"; }
    grep -q "READY=1.*MAINPID=$new" "$log" || { cat "$log"; die "no READY=1 from the new daemon"; }
    check_fio
    # systemctl stop: KillSignal=SIGTERM to the main process, which deletes its device.
    kill -TERM "$new"
    wait_for 60 exited "$new" || die "daemon $new did not stop on SIGTERM"
    wait_for 10 test ! -e "/dev/ublkb$USERBLK_ID" || die "the device outlived the stop"
    grep -q 'STOPPING=1' "$log" || die "no STOPPING=1"
    kill "$listener" 2>/dev/null || true
    echo "note: service manager saw: $(tr '\n' '|' <"$log")"
}

# Two upgrades of one device: the second is refused while the first runs
# (its lock held by hand here, so the overlap is certain), then two started
# at once end with the device LIVE under one new daemon and any loser
# refused with the same line.
concurrent_upgrades() {
    local id pid a b ra=0 rb=0 holder
    id=$(add_dev $UPG mem --size 16M)
    pid=$(list_word "$id" 7)
    # Held by this shell on an fd of its own (flock(1) with a command
    # would leave the lock with the command's child when killed).
    exec {holder}>"/run/userblk/$id.upgrade"
    flock -n "$holder" || die "could not take the upgrade lock by hand"
    one_line_fail "in progress" ub upgrade -n "$id"
    exec {holder}>&-
    still_served_by "$id" "$pid"
    ub upgrade -n "$id" >"$WORK/up-a.out" 2>&1 & a=$!
    ub upgrade -n "$id" >"$WORK/up-b.out" 2>&1 & b=$!
    wait "$a" || ra=$?
    wait "$b" || rb=$?
    echo "upgrade A exit $ra: $(tr '\n' '|' <"$WORK/up-a.out")"
    echo "upgrade B exit $rb: $(tr '\n' '|' <"$WORK/up-b.out")"
    [ "$ra" = 0 ] || [ "$rb" = 0 ] || die "neither upgrade succeeded"
    [ "$ra" = 0 ] || grep -q "in progress" "$WORK/up-a.out" || die "upgrade A failed for another reason"
    [ "$rb" = 0 ] || grep -q "in progress" "$WORK/up-b.out" || die "upgrade B failed for another reason"
    state_is "$id" LIVE || die "device $id not LIVE after two upgrades"
    [ "$(list_word "$id" 7)" != "$pid" ] || die "device $id still has its first daemon"
    exited "$pid" || die "old daemon $pid still runs"
    dd if="/dev/ublkb$id" of=/dev/null bs=4k count=1 iflag=direct status=none || die "device $id does not serve I/O"
    del_dev "$id"
    [ ! -e "/run/userblk/$id.upgrade" ] || die "del left the upgrade lock file"
}

echo "kernel $(uname -r); userblk $("$USERBLK" --version)"
ub features | grep -q USER_RECOVERY || { echo "SKIP all: kernel lacks USER_RECOVERY"; exit 1; }
cleanup_devices
ROUNDS=${UPGRADE_ROUNDS:-5}
plan 12
if has_quiesce; then
    case_run "ext4 + fio verify on mem -r: 10 upgrades (QUIESCE)" upgrades_under_fio 10 -r
    case_run "raw fio QD32 on mem -r: $ROUNDS upgrades back to back" upgrades_back_to_back "$ROUNDS" -r
else
    case_run "ext4 + fio verify on mem --reissue: 3 upgrades (kill + reissue)" upgrades_under_fio 3 --reissue
    case_run "raw fio QD32 on mem --reissue: $ROUNDS upgrades back to back" upgrades_back_to_back "$ROUNDS" --reissue
fi
case_run "systemd unit: ExecStart, ExecReload under fio, stop" systemd_unit_reload
case_run "batch I/O: -r refused with the reason, --reissue upgrades" batch_devices
case_run "a --fail-io device: refused with the reason" fail_io_refused
case_run "broken --binary: served again by this binary, said" broken_new_binary
case_run "upgrade --binary a copy, and back" with_binary_copy
case_run "bad input: one line, device still served" bad_input
case_run "two upgrades at once: one lock, the device LIVE" concurrent_upgrades
case_run "a device without -r: refused with the reason" without_r_refused
case_run "6.12: -r without --reissue: refused with the reason" r_without_reissue_refused
if has_quiesce; then
    case_run "mem --reissue on a QUIESCE kernel: 2 upgrades under fio" upgrades_under_fio 2 --reissue
else
    case_run "mem --reissue on a QUIESCE kernel" skip "this kernel lacks QUIESCE: the reissue case above covered kill + recover"
fi
summary
