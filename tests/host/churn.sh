#!/usr/bin/env bash
# Host suite: add/del churn over the FUSE frontend (+ loop devices), and
# nothing left behind. CHURN_CYCLES add/del cycles (default 20) of each of
# null and mem with 1 and 2 serving threads (-q); then no loop device,
# FUSE mount or connection, state file, socket or userblk process of this
# run may be left, every cycle's daemon must have had as many open fds and
# threads as the first one's, and a device that lived through all cycles
# must have as many fds and threads after them as before, and its RSS
# may not have grown (by more than IDLE_RSS_SLACK_KIB).
# Usage, as root from the repository root (USERBLK overrides the binary):
#   bash tests/host/churn.sh
#   CHURN_CYCLES=1000 bash tests/host/churn.sh          # the long form
# Beside other runs: USERBLK_STATE_DIR=$(mktemp -d) unshare -m --propagation private bash tests/host/churn.sh
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

need_userblk
[[ ${CHURN_CYCLES:-20} =~ ^[1-9][0-9]*$ ]] || { echo "CHURN_CYCLES must be a positive integer"; exit 2; }
CYCLES=${CHURN_CYCLES:-20}
# This run's devices only: its own state directory unless one is given.
if [ -z "${USERBLK_STATE_DIR:-}" ]; then
    host_suite churn
else
    WORK=$(mktemp -d /var/tmp/userblk-churn.XXXXXX)
fi
STATE=$USERBLK_STATE_DIR
mkdir -p "$STATE"
BIN=$(realpath "$USERBLK")
FIRST=$WORK/first   # fds and threads of the first cycle's daemon, per case
WITNESS=

# ---- helpers ------------------------------------------------------------------

needs_fuse() {
    [ "$(id -u)" = 0 ] || skip "needs root (loop devices)"
    [ -e /dev/fuse ] || skip "no /dev/fuse"
}


# The userblk processes of this run: the binary, with this state directory.
our_processes() {
    local p
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = "$BIN" ] || continue
        tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qxF "USERBLK_STATE_DIR=$STATE" && echo "${p#/proc/}"
    done
    return 0
}

# Loop devices whose backing file is in this run's state directory.
our_loops() { losetup -a 2>/dev/null | grep -F "$STATE/" || true; }

# Mounts (in this namespace) under this run's state directory.
our_mounts() { findmnt -rn -o TARGET 2>/dev/null | grep -F "$STATE/" || true; }

# FUSE connections no mount of any process uses (a connection's number is
# its superblock's minor device number, "0:N" in mountinfo): left behind
# by a daemon. Other runs' connections are always mounted somewhere.
orphan_connections() {
    local c used
    used=$(cat /proc/[0-9]*/mountinfo 2>/dev/null | awk '{print $3}' | sed -n 's/^0://p' | sort -u)
    for c in /sys/fs/fuse/connections/*; do
        [ -e "$c" ] || continue
        grep -qx "${c##*/}" <<<"$used" || echo "${c##*/}"
    done
}

# What this run's state directory still holds, logs aside (a log is per
# id, and ids are reused, so they do not grow with the cycles).
state_leftovers() {
    find "$STATE" -mindepth 1 -maxdepth 1 ! -name '*.log' ! -name '.lock' ! -name '*.lock' -printf '%f\n' \
        | grep -vxF "${WITNESS_FILES:-}" || true
}

# One cycle: add, read through the loop device, del; every step checked.
cycle() { # cycle CASE N ARGS...
    local case=$1 n=$2 out id blk pid now; shift 2
    out=$(ub add --frontend fuse --loop "$@" 2>&1) || { echo "$out"; die "add failed"; }
    id=$(dev_id_of "$out")
    blk=$(sed -n 's/.*frontend fuse block \([^ ]*\).*/\1/p' <<<"$out")
    [ -n "$id" ] && [ -n "$blk" ] || die "add printed no id or block device: $out"
    pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$STATE/$id.json" | head -n 1)
    [ -n "$pid" ] || die "no pid in $STATE/$id.json"
    dd if="$blk" of=/dev/null bs=4k count=1 iflag=direct status=none || die "cannot read $blk"
    same_counts_as_first "$case" "$n" "$pid"
    ub del -n "$id" || die "del -n $id failed"
    wait_for 5 exited "$pid" || die "daemon $pid still running"
    [ ! -e "$STATE/$id.json" ] || die "state file $id.json left behind"
    wait_for 5 detached "$blk" || die "$blk still attached"
}

# Loop device BLK no longer has a file of this run (autoclear on last close).
detached() { ! losetup "$1" 2>/dev/null | grep -qF "$STATE/"; }

no_orphan_connections() { [ -z "$(orphan_connections)" ]; }

churn() { # churn CASE ARGS...
    needs_fuse
    churn_cycles "$@"
}

nothing_left() {
    needs_fuse
    local left
    left=$(our_processes | grep -vx "$WITNESS" || true)
    [ -z "$left" ] || die "userblk processes left: $left"
    left=$(our_loops | grep -vF "/fuse-$WITNESS_ID/" || true)
    [ -z "$left" ] || die "loop devices left: $left"
    left=$(our_mounts | grep -vF "/fuse-$WITNESS_ID" || true)
    [ -z "$left" ] || die "mounts left: $left"
    # A connection being torn down by another run is unmounted a moment first.
    wait_for 5 no_orphan_connections || die "FUSE connections without a mount: $(orphan_connections)"
    left=$(state_leftovers)
    [ -z "$left" ] || die "left in the state directory: $left"
    local after
    [ -d "/proc/$WITNESS" ] || die "the long-lived device's daemon is gone (a failed case's clean-up deletes every device)"
    after=$(settled_counts "$WITNESS")
    [ "$after" = "$WITNESS_COUNTS" ] || die "the device that lived through the churn had fds/threads $WITNESS_COUNTS before, $after after"
    echo "note: the long-lived daemon: fds/threads $after; RSS $WITNESS_RSS KiB before, $(rss_kib "$WITNESS") KiB after (huge pages $(huge_kib "$WITNESS") KiB)"
    idle_rss_kept "$WITNESS" "$WITNESS_RSS"
}

fuse_inherits_nothing() {
    needs_fuse
    inherits_nothing --frontend fuse --loop null --size 16M
}

cleanup() {
    del_own_devices "$STATE"
    rm -rf "$WORK"
}
trap cleanup EXIT

# ---- cases ----------------------------------------------------------------------

plan 6
echo "churn over FUSE + loop: $CYCLES cycles per case (CHURN_CYCLES), kernel $(uname -r)"
if [ "$(id -u)" = 0 ] && [ -e /dev/fuse ]; then
    # A device that lives through every cycle: its daemon must not change.
    out=$(ub add --frontend fuse --loop mem --size 16M 2>&1) || { echo "add of the long-lived device failed: $out"; exit 1; }
    WITNESS_ID=$(dev_id_of "$out")
    WITNESS=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$STATE/$WITNESS_ID.json" | head -n 1)
    WITNESS_COUNTS=$(settled_counts "$WITNESS")
    WITNESS_RSS=$(rss_kib "$WITNESS")
    WITNESS_FILES=$(find "$STATE" -mindepth 1 -maxdepth 1 ! -name '*.log' ! -name '*.lock' -printf '%f\n')
fi
case_run "churn null -q 1" churn null-q1 null --size 64M -q 1
case_run "churn null -q 2" churn null-q2 null --size 64M -q 2
case_run "churn mem -q 1" churn mem-q1 mem --size 16M -q 1
case_run "churn mem -q 2" churn mem-q2 mem --size 16M -q 2
case_run "the daemon gets no descriptor of add's caller" fuse_inherits_nothing
case_run "nothing left after the churn" nothing_left
summary
