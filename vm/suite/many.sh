#!/usr/bin/env bash
# Real-kernel suite for many ublk devices at once: MANY_DEVICES (32; 256 in
# bench/many.sh) mem 16M devices all LIVE; `list` and `list --json` within
# LIST_BOUND_MS (2000 under TCG; the goal, 1 s, is for hardware); an idle
# daemon within COST_RSS_KIB (4096) Pss and its queue threads plus one
# (the main thread, which also serves signals and the control socket);
# `del -a` in bounded time, leaving no device node, daemon or state file;
# and a user's device past the driver's `ublks_max` refused up front,
# naming the limit (the parameter is writable: no module reload needed).
# Runs inside the VM (vm/run.sh), as root, from the repository root.
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh
. vm/suite/many-lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
[ -e /dev/ublk-control ] || modprobe ublk_drv || true
: "${MANY_DEVICES:=32}" "${LIST_BOUND_MS:=2000}" "${COST_RSS_KIB:=4096}"
WORK=/run/many-suite
HELPER=$PWD/contrib/udev/userblk-owner
TEST_UID=${TEST_UID:-1000}
mkdir -p "$WORK"
DEL_BOUND_MS=$(( (MANY_DEVICES / 16 + 2) * 10000 ))

ublk_nodes() { ls /sys/class/ublk-char 2>/dev/null | wc -l; }

all_live() {
    local t0 ms n
    t0=$(ms_now)
    many_add "$MANY_DEVICES" -q 1 mem --size 16M >"$WORK/ids"
    ms=$(( $(ms_now) - t0 ))
    n=$(wc -l <"$WORK/ids")
    [ "$n" = "$MANY_DEVICES" ] || die "$n of $MANY_DEVICES devices came up"
    many_list >"$WORK/list"
    [ "$(grep -c ' LIVE$' "$WORK/list")" = "$MANY_DEVICES" ] || die "not all LIVE: $(grep -v ' LIVE$' "$WORK/list" | head -n 3)"
    local id
    while read -r id; do [ -b "/dev/ublkb$id" ] || die "/dev/ublkb$id missing"; done <"$WORK/ids"
    echo "note: $MANY_DEVICES devices up in $ms ms ($(( ms / MANY_DEVICES )) ms each, ${MANY_PARALLEL:-8} adds at a time)"
}


# Names the threads of up to three daemons PID..., for a failure.
show_threads() {
    local p
    for p in "$@"; do echo "daemon $p threads: $(cat /proc/"$p"/task/*/comm | tr '\n' ' ')"; done | head -3
}

idle_cost() {
    [ -s "$WORK/list" ] || skip "no devices (the first case failed)"
    local rss_avg rss_max pss_avg pss_max threads id2 pid2 threads2
    # A -q 2 device beside them: the bound grows with the queues.
    id2=$(dev_id_of "$(ub add -q 2 mem --size 16M)")
    [ -n "$id2" ] || die "a -q 2 device did not come up"
    sleep 2
    read -r rss_avg rss_max pss_avg pss_max threads < <(many_cost $(awk '{print $2}' "$WORK/list"))
    echo "note: idle ublk mem 16M -q 1 ($(uname -r)): Rss avg $rss_avg KiB (max $rss_max), Pss avg $pss_avg KiB (max $pss_max), threads max $threads"
    [ "$pss_max" -le "$COST_RSS_KIB" ] || die "a daemon's Pss is $pss_max KiB (over $COST_RSS_KIB)"
    # The queue's thread and the main thread.
    if [ "$threads" -gt 2 ]; then
        show_threads $(awk '{print $2}' "$WORK/list")
        die "a daemon has $threads threads (over 2 for -q 1)"
    fi
    pid2=$(many_list | awk -v id="$id2" '$1 == id {print $2}')
    read -r _ _ threads2 < <(daemon_cost "$pid2")
    echo "note: idle ublk -q 2: $threads2 threads"
    if [ "$threads2" -gt 3 ]; then
        show_threads "$pid2"
        die "a -q 2 daemon has $threads2 threads (over 3)"
    fi
    ub del -n "$id2"
}

del_all() {
    [ -s "$WORK/list" ] || skip "no devices (the first case failed)"
    local ms
    ms=$(ms_of ub del -a) || die "del -a failed"
    echo "note: del -a of $MANY_DEVICES devices in $ms ms"
    [ "$ms" -lt "$DEL_BOUND_MS" ] || die "del -a took $ms ms (bound $DEL_BOUND_MS)"
    wait_for 10 many_leftovers /run/userblk "$WORK" $(awk '{print $2}' "$WORK/list") 2>/dev/null \
        || many_leftovers /run/userblk "$WORK" $(awk '{print $2}' "$WORK/list") || die "del -a left something"
    [ "$(ublk_nodes)" = 0 ] || die "ublk devices left: $(ls /sys/class/ublk-char)"
}

# A user's second device past ublks_max=1: refused before ADD_DEV, naming
# the parameter; nothing made. Root's devices are privileged and do not count.
ublks_max_refused() {
    local param=/sys/module/ublk_drv/parameters/ublks_max old id before
    [ -w "$param" ] || skip "$param is not writable here"
    command -v setpriv >/dev/null || skip "no setpriv (util-linux)"
    ub features | grep -q UNPRIVILEGED_DEV || skip "kernel lacks UNPRIVILEGED_DEV"
    old=$(cat "$param")
    start_owner_loop
    # The case runs in a subshell of its own: put the limit back however it ends.
    # shellcheck disable=SC2064
    trap "echo $old >$param; stop_owner_loop" EXIT
    echo 1 >"$param"
    local as_user=(setpriv --reuid="$TEST_UID" --regid="$TEST_UID" --clear-groups env -u USERBLK_STATE_DIR -u XDG_RUNTIME_DIR HOME=/tmp)
    id=$(dev_id_of "$("${as_user[@]}" "$USERBLK" add mem --size 16M)")
    [ -n "$id" ] || die "the user's first device did not come up"
    before=$(ublk_nodes)
    expect_fail "ublks_max is 1" "${as_user[@]}" "$USERBLK" add mem --size 16M
    expect_fail "echo 64 > $param" "${as_user[@]}" "$USERBLK" add mem --size 16M
    [ "$(ublk_nodes)" = "$before" ] || die "a refused add made a device"
    # Root's devices are privileged: not counted (Linux 6.15+ and the
    # stable kernels with that change); an older kernel counts every device,
    # and its refusal must name the limit too.
    local out rc=0
    out=$(ub add mem --size 16M 2>&1) || rc=$?
    if [ "$rc" = 0 ]; then
        del_dev "$(dev_id_of "$out")"
        echo "note: $(uname -r) counts only unprivileged devices against ublks_max"
    else
        grep -q "ublks_max" <<<"$out" || die "root's add failed without naming ublks_max: $out"
        echo "note: $(uname -r) counts every device against ublks_max"
    fi
    ub del -n "$id"
}

. vm/suite/owner-loop.sh
trap 'ub del -a >/dev/null 2>&1; rm -rf "$WORK"' EXIT
echo "kernel $(uname -r); userblk $("$USERBLK" --version); $MANY_DEVICES devices"
cleanup_devices
plan 5
case_run "$MANY_DEVICES mem 16M devices come up LIVE" all_live
case_run "list and list --json within ${LIST_BOUND_MS} ms" list_within_bound
case_run "an idle daemon: Pss <= ${COST_RSS_KIB} KiB, threads <= queues + 1" idle_cost
case_run "del -a stops them all in bounded time, leaves nothing" del_all
case_run "a user's device past ublks_max: refused up front, naming it" ublks_max_refused
summary
