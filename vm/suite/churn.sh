#!/usr/bin/env bash
# Real-kernel suite: add/del churn of ublk devices, nothing left behind,
# and the deadline on START_DEV. CHURN_CYCLES add/del cycles (default 15)
# of each of null and mem with 1 and 2 queues; then no /dev/ublkc*,
# /dev/ublkb*, /sys/class/ublk-char entry, state file, socket or userblk
# process may be left, every cycle's daemon must have had as many fds and
# threads as the first one's, and a device that lived through all cycles
# as many fds and threads after them as before, and an RSS no more than
# IDLE_RSS_SLACK_KIB over what it had. Last, a daemon whose
# queues never fetch (the test fail point USERBLK_FAILPOINT=no-fetch):
# START_DEV never completes, and `add` must fail within its deadline
# naming the step and the kernel, leaving no device.
# Runs inside the VM (vm/run.sh), as root, from the repository root:
#   vm/run.sh -- vm/suite/churn.sh       CHURN_CYCLES=1000 (via USERBLK_VM_PASSENV) for the long form
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
[[ ${CHURN_CYCLES:-15} =~ ^[1-9][0-9]*$ ]] || { echo "CHURN_CYCLES must be a positive integer"; exit 2; }
CYCLES=${CHURN_CYCLES:-15}
STATE=/run/userblk
WORK=$(mktemp -d /tmp/churn-suite.XXXXXX)
FIRST=$WORK/first
BIN=$(realpath "$USERBLK")
# START_DEV's deadline (ublk::deadline::START) and what may come on top:
# the cancel's grace, the queues' exit, DEL_DEV and the daemon's exit.
START_DEADLINE=30
ADD_FAILS_WITHIN=75


our_processes() {
    local p
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = "$BIN" ] && echo "${p#/proc/}"
    done
    return 0
}

# Every ublk device the kernel has: char nodes, block nodes, sysfs entries.
ublk_objects() {
    ls -d /dev/ublkc* /dev/ublkb* /sys/class/ublk-char/* 2>/dev/null || true
}

# The state directory, logs and the id lock aside (a log is per id, and
# ids are reused, so they do not grow with the cycles).
state_files() {
    find "$STATE" -mindepth 1 -maxdepth 1 ! -name '*.log' ! -name '.lock' -printf '%f\n' 2>/dev/null | sort
}

gone() { [ ! -e "/dev/ublkb$1" ] && [ ! -e "/dev/ublkc$1" ] && [ ! -e "/sys/class/ublk-char/ublkc$1" ]; }

cycle() { # cycle CASE N ARGS...
    local case=$1 n=$2 out id pid now; shift 2
    out=$(ub add "$@" 2>&1) || { echo "$out"; die "add failed"; }
    id=$(dev_id_of "$out")
    [ -n "$id" ] || die "no id in add output: $out"
    [ -b "/dev/ublkb$id" ] || die "/dev/ublkb$id missing after add"
    pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$STATE/$id.json" | head -n 1)
    [ -n "$pid" ] || die "no pid in $STATE/$id.json"
    dd if="/dev/ublkb$id" of=/dev/null bs=4k count=1 iflag=direct status=none || die "cannot read /dev/ublkb$id"
    same_counts_as_first "$case" "$n" "$pid"
    ub del -n "$id" || die "del -n $id failed"
    wait_for 10 exited "$pid" || die "daemon $pid still running"
    wait_for 10 gone "$id" || die "device $id still exists: $(ublk_objects)"
    [ ! -e "$STATE/$id.json" ] || die "state file $id.json left behind"
}


nothing_left() {
    local left after
    left=$(our_processes | grep -vx "$WITNESS" || true)
    [ -z "$left" ] || die "userblk processes left: $left"
    left=$(ublk_objects | grep -v "ublk[bc]$WITNESS_ID\$" || true)
    [ -z "$left" ] || die "ublk devices left: $left"
    left=$(state_files | grep -vxF "$WITNESS_FILES" || true)
    [ -z "$left" ] || die "left in $STATE: $left"
    [ -d "/proc/$WITNESS" ] || die "the long-lived device's daemon is gone (a failed case's clean-up deletes every device)"
    after=$(settled_counts "$WITNESS")
    [ "$after" = "$WITNESS_COUNTS" ] || die "the device that lived through the churn had fds/threads $WITNESS_COUNTS before, $after after"
    echo "note: the long-lived daemon: fds/threads $after; RSS $WITNESS_RSS KiB before, $(rss_kib "$WITNESS") KiB after (huge pages $(huge_kib "$WITNESS") KiB)"
    idle_rss_kept "$WITNESS" "$WITNESS_RSS"
}

# START_DEV that never completes: `add` fails within the deadline, names
# the step, the device and the kernel, and leaves nothing.
start_dev_deadline() {
    local before out rc=0 start took
    before=$(ublk_objects)
    start=$SECONDS
    out=$(USERBLK_FAILPOINT=no-fetch ub add null --size 16M -q 2 2>&1) || rc=$?
    took=$(( SECONDS - start ))
    echo "\$ USERBLK_FAILPOINT=no-fetch userblk add null --size 16M -q 2 -> exit $rc after ${took}s: $out"
    [ "$rc" -ne 0 ] || die "add succeeded though no queue fetched"
    [ "$rc" -lt 128 ] || die "add crashed with signal $((rc - 128))"
    [ "$(wc -l <<<"$out")" = 1 ] || die "not one line: $out"
    grep -qE "^userblk: device [0-9]+: START_DEV: no answer from the kernel \\($(uname -r | sed 's/[.+]/\\&/g')\\) within ${START_DEADLINE}s\$" <<<"$out" \
        || die "the error does not name the device, the step, the kernel and the deadline: $out"
    [ "$took" -ge "$START_DEADLINE" ] || die "add failed after ${took}s, before the deadline"
    [ "$took" -le "$ADD_FAILS_WITHIN" ] || die "add took ${took}s, more than ${ADD_FAILS_WITHIN}s"
    wait_for 10 same_objects "$before" || die "a device was left: $(ublk_objects)"
    [ -z "$(our_processes | grep -vx "$WITNESS")" ] || die "a daemon was left: $(our_processes)"
    [ -z "$(state_files | grep -vxF "$WITNESS_FILES")" ] || die "left in $STATE: $(state_files)"
    echo "note: add failed after ${took}s: $out"
}

same_objects() { [ "$(ublk_objects)" = "$1" ]; }

KHUGEPAGED=/sys/kernel/mm/transparent_hugepage/khugepaged
KHUGEPAGED_SLEEP=$(cat "$KHUGEPAGED/scan_sleep_millisecs" 2>/dev/null)
cleanup() {
    ub del -a --force >/dev/null 2>&1 || true
    rm -rf "$WORK"
    # The suites after this one in the same boot (vm/suite/several.sh) get the kernel's pace back.
    [ -z "$KHUGEPAGED_SLEEP" ] || echo "$KHUGEPAGED_SLEEP" >"$KHUGEPAGED/scan_sleep_millisecs" 2>/dev/null || true
}
trap cleanup EXIT

plan 7
echo "ublk churn: $CYCLES cycles per case (CHURN_CYCLES), kernel $(uname -r)"
# khugepaged every 0.1 s instead of 10 s (until cleanup): a collapse of the
# long-lived daemon's memory into huge pages then shows within the suite.
[ -w "$KHUGEPAGED/scan_sleep_millisecs" ] && echo 100 >"$KHUGEPAGED/scan_sleep_millisecs"
[ -z "$(ublk_objects)" ] || echo "warning: ublk devices exist before the suite: $(ublk_objects)"
# A device that lives through every cycle: its daemon must not change.
out=$(ub add mem --size 16M 2>&1) || { echo "add of the long-lived device failed: $out"; exit 1; }
WITNESS_ID=$(dev_id_of "$out")
WITNESS=$(list_word "$WITNESS_ID" 7)
WITNESS_COUNTS=$(settled_counts "$WITNESS")
WITNESS_RSS=$(rss_kib "$WITNESS")
WITNESS_FILES=$(state_files)
case_run "churn null -q 1" churn_cycles null-q1 null --size 64M -q 1
case_run "churn null -q 2" churn_cycles null-q2 null --size 64M -q 2
case_run "churn mem -q 1" churn_cycles mem-q1 mem --size 16M -q 1
case_run "churn mem -q 2" churn_cycles mem-q2 mem --size 16M -q 2
case_run "the daemon gets no descriptor of add's caller" inherits_nothing null --size 16M
case_run "nothing left after the churn" nothing_left
case_run "START_DEV without an answer: add fails in time" start_dev_deadline
summary
