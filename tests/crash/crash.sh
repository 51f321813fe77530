#!/usr/bin/env bash
# Crash-consistency bench: ext4 and xfs on a mem device under the flakey
# filter (a disk with a volatile write cache). Each round mounts the file
# system, runs a workload that fsyncs files and records what each fsync
# made durable (tests/crash/workload.py), cuts the power at a chosen point
# (just after N operations and a burst of unflushed writes, or at a random
# time; through `userblk ctl` or the trigger file), unmounts (errors
# expected), restores power and checks:
#   - the file system is clean: the kernel replays its journal/log (mount,
#     unmount), then `e2fsck -fn` / `xfs_repair -n` find nothing at all;
#   - every name whose fsync returned holds exactly what was fsync'd (or,
#     for a replace or delete under way, the old or new state).
# Nothing else is required of data nobody fsync'd. Rounds follow each other
# on the same, ageing file system, and every round re-checks every earlier
# round's files. Then a self-check: the same rounds on
# `flakey:broken=ack-flush` (flushes acknowledged, nothing written down)
# must fail; the case passes when the bench catches it.
#
# Usage (root, from the repository root; USERBLK overrides the binary):
#   bash tests/crash/crash.sh [--frontend ublk|fuse] [--fs "ext4 xfs"]
#        [--rounds N] [--broken-rounds N] [--seed N]
# In the VM: vm/suite/crash.sh (ublk). On a host without ublk: --frontend fuse
# (a FUSE file with a loop device). ONLY=regex runs matching cases.
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

FRONTEND=fuse
FILESYSTEMS="ext4 xfs"
ROUNDS=20
BROKEN_ROUNDS=4
SEED=${SEED:-$(( $(date +%s) % 100000 ))}
SIZE=${CRASH_SIZE:-384M}  # xfs needs at least 300M
while [ $# -gt 0 ]; do
    case $1 in
        --frontend) FRONTEND=$2; shift 2 ;;
        --fs) FILESYSTEMS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --broken-rounds) BROKEN_ROUNDS=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        *) echo "unknown argument $1"; exit 2 ;;
    esac
done

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }

WORK=$(mktemp -d /var/tmp/userblk-crash.XXXXXX)
if [ -z "${USERBLK_VM:-}" ]; then
    # On the host: a private state directory, so only our devices are touched.
    export USERBLK_STATE_DIR=$WORK/state
fi
STATE_DIR=${USERBLK_STATE_DIR:-/run/userblk}
MNT=$WORK/mnt
TRIGGER=$WORK/power-cut
mkdir -p "$MNT"
PY=$(command -v python3 || true)
WL="tests/crash/workload.py"

# Only our own devices: the ids in our state directory.
cleanup_devices() {
    umount "$MNT" 2>/dev/null || true
    rm -f "$TRIGGER"
    del_own_devices "$STATE_DIR"
}
trap 'cleanup_devices; rm -rf "$WORK"' EXIT

needs() { local t; for t in "$@"; do command -v "$t" >/dev/null || skip "$t is not installed"; done; }

needs_fs() { # needs_fs FS
    [ "$(id -u)" = 0 ] || skip "needs root"
    [ -n "$PY" ] || skip "python3 is not installed"
    case $1 in
        ext4) needs mkfs.ext4 e2fsck ;;
        xfs) needs mkfs.xfs xfs_repair ;;
    esac
    grep -qw "$1" /proc/filesystems || modprobe "$1" 2>/dev/null || true
    grep -qw "$1" /proc/filesystems || skip "this kernel has no $1"
    if [ "$FRONTEND" = fuse ]; then
        [ -e /dev/fuse ] || skip "no /dev/fuse"
        [ -e /dev/loop-control ] || skip "no loop devices"
    else
        [ -e /dev/ublk-control ] || modprobe ublk_drv 2>/dev/null || true
        [ -e /dev/ublk-control ] || skip "no ublk in this kernel"
    fi
}

# Add a flakey mem device; print "ID BLOCKDEV".
add_flakey() { # add_flakey FLAKEY-OPTIONS
    local out id dev fe=(--frontend ublk)
    [ "$FRONTEND" = fuse ] && fe=(--frontend fuse --loop)
    rm -f "$TRIGGER"
    out=$(ub add mem --size "$SIZE" "${fe[@]}" --filter "flakey:trigger=$TRIGGER$1") || { echo "$out" >&2; return 1; }
    echo "$out" >&2
    id=$(dev_id_of "$out")
    dev=$(sed -n 's/.*frontend [a-z]* block \([^ ]*\).*/\1/p' <<<"$out")
    [ -n "$id" ] && [ -b "$dev" ] || die "add printed no id or block device"
    if [ "$FRONTEND" = fuse ]; then
        local dio
        dio=$(cat "/sys/block/$(basename "$dev")/loop/dio" 2>/dev/null || echo "?")
        echo "loop direct I/O: $dio" >&2
    fi
    echo "$id $dev"
}

mkfs_fs() { # mkfs_fs FS DEV
    case $1 in
        ext4) mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$2" ;;
        xfs) mkfs.xfs -q -f "$2" ;;
    esac
}

fsck_fs() { # fsck_fs FS DEV: the file system must be clean (after log replay)
    case $1 in
        ext4) e2fsck -fn "$2" ;;
        xfs) xfs_repair -n "$2" ;;
    esac
}

power_up() { # power_up ID VIA(ctl|file) DEV
    case $2 in
        ctl) ub ctl -n "$1" powerup ;;
        # The filter looks at the file when requests come: send one.
        file) rm -f "$TRIGGER"; sleep 0.01
              dd if="$3" of=/dev/null bs=4k count=1 iflag=direct status=none 2>/dev/null || true ;;
    esac
}

# Wait for the flakey filter of device ID to report the power STATE (true/false).
wait_power() { # wait_power ID true|false
    local i
    for i in $(seq 1 100); do
        ub ctl -n "$1" status | grep -q "\"powered\":$2" && return 0
        sleep 0.05
    done
    return 1
}

umount_after_cut() {
    local i
    for i in 1 2 3 4 5 6 7 8 9 10; do
        umount "$MNT" 2>/dev/null && return 0
        sleep 0.5
    done
    umount "$MNT"
}

# One round: mount, workload, cut, unmount, power up, check. Prints a
# one-line summary; on a failure prints FAILED: <reason> and returns 1.
round() { # round FS ID DEV ROUND MANIFEST
    local fs=$1 id=$2 dev=$3 r=$4 man=$5 via mode cutcmd wl_out cut t lost rc=0 wl_rc=0
    local seed=$((SEED * 1000 + r))
    via=$([ $((r % 2)) = 0 ] && echo ctl || echo file)
    if [ $(((r + 1) / 2 % 2)) = 1 ]; then mode=ops; else mode=time; fi
    rm -f "$TRIGGER"
    mount "$dev" "$MNT" || { echo "FAILED: round $r: mount before the workload"; return 1; }
    wl_out=$WORK/wl.out
    if [ "$via" = ctl ]; then cutcmd="$USERBLK ctl -n $id powercut"; else cutcmd="touch $TRIGGER"; fi
    if [ "$mode" = ops ]; then
        local k=$(( (seed * 7919) % 70 + 5 ))
        cut=(--cut-after "$k" --ops $((k + 200)))
        t="after $k ops"
    else
        local ms=$(( (seed * 104729) % 1500 + 30 ))
        cut=(--cut-at-ms "$ms" --ops 1000000)
        t="at $ms ms"
    fi
    timeout 300 "$PY" "$WL" run --dir "$MNT" --manifest "$man" --round "$r" --seed "$seed" \
        "${cut[@]}" --cut-cmd "$cutcmd" --expect-cut >"$wl_out" 2>&1 || wl_rc=$?
    sed 's/^/  workload: /' "$wl_out"
    wait_power "$id" false || {
        echo "FAILED: round $r: the workload ended (exit $wl_rc) and the power cut ($via) did not happen"
        return 1
    }
    [ "$wl_rc" = 0 ] || { echo "FAILED: round $r: the workload failed (exit $wl_rc)"; return 1; }
    lost=$(ub ctl -n "$id" status | sed -n 's/.*"lost_at_last_cut":{"pieces":\([0-9]*\),"bytes":\([0-9]*\)}.*/\1 pieces, \2 bytes/p')
    umount_after_cut || { echo "FAILED: round $r: cannot unmount after the cut"; return 1; }
    # Clean pages of the dead disk still in the kernel's cache must not
    # hide what the disk lost (the FUSE frontend's loop device stays open).
    blockdev --flushbufs "$dev" 2>/dev/null || true
    power_up "$id" "$via" "$dev"
    wait_power "$id" true || { echo "FAILED: round $r: power did not come back"; return 1; }
    # Recovery: the kernel replays the journal/log; then the checker must find nothing.
    mount "$dev" "$MNT" || { echo "FAILED: round $r: the recovery mount failed"; return 1; }
    umount "$MNT" || { echo "FAILED: round $r: unmount after recovery"; return 1; }
    fsck_fs "$fs" "$dev" >"$WORK/fsck.out" 2>&1 || rc=$?
    if [ "$rc" != 0 ]; then
        sed 's/^/  fsck: /' "$WORK/fsck.out" | tail -n 25
        echo "FAILED: round $r: $fs is not clean after the cut $t ($via): fsck exit $rc"
        return 1
    fi
    mount "$dev" "$MNT" || { echo "FAILED: round $r: mount after fsck"; return 1; }
    "$PY" "$WL" verify --dir "$MNT" --manifest "$man" >"$WORK/verify.out" 2>&1 || rc=$?
    umount "$MNT" || true
    sed 's/^/  /' "$WORK/verify.out"
    if [ "$rc" != 0 ]; then
        echo "FAILED: round $r: fsync'd data lost or wrong after the cut $t ($via)"
        return 1
    fi
    local pruned after; pruned=$(grep -c '^pruned' "$wl_out" || true)
    [ "$pruned" = 0 ] && pruned="" || pruned=" after pruning $pruned earlier rounds"
    # fsyncs that returned after the cut started: they promise nothing.
    after=$(sed -n 's/.*"after_cut": \([0-9]*\).*/\1/p' "$wl_out")
    echo "round $r: cut $t via $via (lost $lost held back, ${after:-0} fsyncs after the cut)$pruned: clean; $(tail -n 1 "$WORK/verify.out")"
}

# The bench on FS: ROUNDS rounds that must all pass (EXPECT=pass), or
# rounds on a broken disk of which one must fail (EXPECT=catch).
bench() { # bench FS ROUNDS EXPECT FLAKEY-OPTIONS
    local fs=$1 n=$2 expect=$3 opts=$4 id dev r man out b started=$SECONDS lossy=0 lost_bytes=0
    needs_fs "$fs"
    read -r id dev < <(add_flakey "$opts") || die "add failed"
    [ -n "$id" ] || die "add failed"
    mkfs_fs "$fs" "$dev"
    # The starting point is durable whatever the disk's flushes do.
    ub ctl -n "$id" writeback
    man=$WORK/$fs$opts.manifest
    man=${man//[,:=]/_}
    : >"$man"
    for r in $(seq 1 "$n"); do
        out=$(round "$fs" "$id" "$dev" "$r" "$man") || true
        echo "$out"
        if grep -q '^FAILED: ' <<<"$out"; then
            cleanup_devices
            if [ "$expect" = catch ]; then
                echo "note: $fs$opts: caught in round $r: $(sed -n 's/^FAILED: round [0-9]*: //p' <<<"$out")"
                grep -m 2 -e 'MISMATCH' -e '^  verified' -e '^  fsck: ' <<<"$out" | sed 's/^ */note:   /' || true
                return 0
            fi
            tail -n 20 "$STATE_DIR/$id.log" 2>/dev/null | sed 's/^/daemon: /'
            die "$(grep '^FAILED: ' <<<"$out")"
        fi
        echo "note: $(grep '^round ' <<<"$out")"
        b=$(sed -n 's/.*(lost [0-9]* pieces, \([0-9]*\) bytes held back.*/\1/p' <<<"$out")
        if [ "${b:-0}" -gt 0 ]; then lossy=$((lossy + 1)); lost_bytes=$((lost_bytes + b)); fi
    done
    ub ctl -n "$id" status
    ub del -n "$id"
    [ "$expect" = pass ] || die "$n rounds on flakey$opts passed: the bench did not catch a disk that acknowledges flushes without writing"
    echo "note: $fs: $n cut points ($lossy of them threw away unflushed writes, $lost_bytes bytes in all), all clean with every fsync'd file intact ($((SECONDS - started)) s)"
}

ctl_errors() {
    local out id dev
    [ "$(id -u)" = 0 ] || skip "needs root"
    needs_fs ext4
    expect_fail "no device with id 4242" ub ctl -n 4242 powercut
    read -r id dev < <(add_flakey "")
    out=$(ub ctl -n "$id")
    echo "$out"
    grep -q '^powercut ' <<<"$out" || die "ctl lists no powercut action"
    expect_fail "no control action 'nope' (it offers: powercut, powerup, writeback, status)" ub ctl -n "$id" nope
    ub ctl -n "$id" powercut | grep -q "power cut" || die "powercut said nothing"
    ub ctl -n "$id" powercut | grep -q "already off" || die "a second powercut"
    expect_fail "Input/output error" dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct
    expect_fail "the power is off" ub ctl -n "$id" writeback
    ub ctl -n "$id" powerup | grep -q "power restored" || die "powerup said nothing"
    dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none || die "no I/O after powerup"
    ub del -n "$id"
    # A device without filters serves its socket too, and says it has no actions.
    read -r id dev < <(add_plain)
    expect_fail "none of its filters offers actions" ub ctl -n "$id" powercut
    ub del -n "$id"
}

add_plain() {
    local out fe=(--frontend ublk)
    [ "$FRONTEND" = fuse ] && fe=(--frontend fuse --loop)
    out=$(ub add mem --size 16M "${fe[@]}") || return 1
    echo "$(dev_id_of "$out") x"
}

echo "crash bench: frontend $FRONTEND, file systems $FILESYSTEMS, $ROUNDS rounds each, seed $SEED"
cleanup_devices
plan $((1 + 2 * $(wc -w <<<"$FILESYSTEMS")))  # ctl_errors, then two per file system
case_run "ctl: powercut/powerup, EIO while off, errors" ctl_errors
for fs in $FILESYSTEMS; do
    case_run "$fs: $ROUNDS power cuts, fsck clean, fsync'd files intact" bench "$fs" "$ROUNDS" pass ""
done
for fs in $FILESYSTEMS; do
    case_run "self-check: $fs on flakey:broken=ack-flush is caught" bench "$fs" "$BROKEN_ROUNDS" catch ",broken=ack-flush"
done
summary
