#!/usr/bin/env bash
# Host suite for many devices at once over the FUSE frontend with loop
# devices, as root: MANY_DEVICES (32; 256 for the full run) mem 16M devices
# all come up LIVE; `list` and `list --json` answer within LIST_BOUND_MS
# (1000); an idle daemon costs at most COST_RSS_KIB (4096) Pss and its
# serving threads plus two (the main thread, which also serves signals and
# the control socket, and the thread running the fuser session, which
# fuser needs: docs/DESIGN.md "Threads"); `del -a` removes every one in bounded time
# and leaves nothing (process, state file, socket, mount, loop device);
# limits are refused up front, naming them. (ublk: vm/suite/many.sh.)
# Usage: bash tests/host/many.sh   (from the repository root; USERBLK overrides the binary)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh
. vm/suite/many-lib.sh

host_suite many
: "${MANY_DEVICES:=32}" "${LIST_BOUND_MS:=1000}" "${COST_RSS_KIB:=4096}"
# `del -a` of N devices: 16 at a time, each within its 10 s.
DEL_BOUND_MS=$(( (MANY_DEVICES / 16 + 2) * 10000 ))
PIDS=()

needs_host() {
    [ "$(id -u)" = 0 ] || skip "needs root"
    [ -e /dev/fuse ] || skip "no /dev/fuse"
    [ -e /dev/loop-control ] || modprobe loop 2>/dev/null || skip "no loop devices"
    # `del -a` must reach this suite's devices only: ublk devices are the kernel's, not the state directory's.
    [ ! -e /dev/ublk-control ] || skip "this host has ublk: del -a would reach its devices (see vm/suite/many.sh)"
    needs python3 losetup
}

case_all_come_up() {
    needs_host
    local t0 ms n
    t0=$(ms_now)
    many_add "$MANY_DEVICES" --frontend fuse --loop -q 1 mem --size 16M >"$WORK/ids"
    ms=$(( $(ms_now) - t0 ))
    n=$(wc -l <"$WORK/ids")
    [ "$n" = "$MANY_DEVICES" ] || die "$n of $MANY_DEVICES devices came up"
    many_list >"$WORK/list"
    [ "$(grep -c ' LIVE$' "$WORK/list")" = "$MANY_DEVICES" ] || die "not all LIVE: $(grep -v ' LIVE$' "$WORK/list" | head -n 3)"
    echo "note: $MANY_DEVICES devices up in $ms ms ($(( ms / MANY_DEVICES )) ms each, ${MANY_PARALLEL:-8} adds at a time)"
}

case_list_is_fast() {
    needs_host
    list_within_bound
}

case_idle_cost() {
    needs_host
    [ -s "$WORK/list" ] || skip "no devices (the first case failed)"
    local cost rss_avg rss_max pss_avg pss_max threads id2 pid2 threads2
    # A -q 2 device beside them: the bound grows with the serving threads.
    id2=$(dev_id_of "$(ub add --frontend fuse --loop -q 2 mem --size 16M)")
    [ -n "$id2" ] || die "a -q 2 device did not come up"
    # Let the adds' udev probes and the kernel's first reads settle.
    sleep 2
    mapfile -t PIDS < <(awk '{print $2}' "$WORK/list")
    cost=$(many_cost "${PIDS[@]}")
    read -r rss_avg rss_max pss_avg pss_max threads <<<"$cost"
    echo "note: idle FUSE + loop mem 16M -q 1: Rss avg $rss_avg KiB (max $rss_max), Pss avg $pss_avg KiB (max $pss_max), threads max $threads"
    [ "$pss_max" -le "$COST_RSS_KIB" ] || die "a daemon's Pss is $pss_max KiB (over $COST_RSS_KIB)"
    # One serving thread, the main thread and the fuser session's.
    [ "$threads" -le 3 ] || die "a daemon has $threads threads (over 3 for -q 1): $(cat /proc/"${PIDS[0]}"/task/*/comm | tr '\n' ' ')"
    pid2=$(many_list | awk -v id="$id2" '$1 == id {print $2}')
    read -r _ _ threads2 < <(daemon_cost "$pid2")
    echo "note: idle FUSE + loop -q 2: $threads2 threads"
    [ "$threads2" -le 4 ] || die "a -q 2 daemon has $threads2 threads (over 4): $(cat /proc/"$pid2"/task/*/comm | tr '\n' ' ')"
    del_served "$id2"
}

case_del_all_cleans_up() {
    needs_host
    [ -s "$WORK/list" ] || skip "no devices (the first case failed)"
    [ "${#PIDS[@]}" -gt 0 ] || mapfile -t PIDS < <(awk '{print $2}' "$WORK/list")
    local ms
    ms=$(ms_of ub del -a) || die "del -a failed"
    echo "note: del -a of $MANY_DEVICES devices in $ms ms"
    [ "$ms" -lt "$DEL_BOUND_MS" ] || die "del -a took $ms ms (bound $DEL_BOUND_MS)"
    wait_for 10 many_leftovers "$USERBLK_STATE_DIR" "$WORK" "${PIDS[@]}" 2>/dev/null \
        || many_leftovers "$USERBLK_STATE_DIR" "$WORK" "${PIDS[@]}" || die "del -a left something"
    [ -z "$(ub list)" ] || die "list still shows devices"
}

case_limits_refused_up_front() {
    needs_host
    local before
    before=$(ls "$USERBLK_STATE_DIR" 2>/dev/null | wc -l)
    # 8 serving threads need more fds than 40: refused before a daemon starts.
    expect_fail "RLIMIT_NOFILE" bash -c "ulimit -n 40; exec \"$USERBLK\" add --frontend fuse --loop -q 8 mem --size 16M"
    [ "$(ls "$USERBLK_STATE_DIR" 2>/dev/null | wc -l)" = "$before" ] || die "a refused add left state: $(ls "$USERBLK_STATE_DIR")"
    [ -z "$(ub list)" ] || die "a refused add left a device"
    # A soft limit under the need is raised within the hard one.
    local id file
    read -r id file < <(bash -c "ulimit -Sn 40; exec \"$USERBLK\" add --frontend fuse -q 8 mem --size 16M" \
        | sed -n 's/^dev id \([0-9]*\):.*/\1/p; s/.*frontend fuse block \([^ ]*\).*/\1/p' | paste -sd' ')
    [ -n "$id" ] && [ -f "$file" ] || die "add under a soft limit of 40 did not come up"
    del_served "$id"
}

trap 'del_own_devices; rm -rf "$WORK"' EXIT

plan 5
case_run "$MANY_DEVICES mem 16M devices over FUSE + loop come up LIVE" case_all_come_up
case_run "list and list --json answer within ${LIST_BOUND_MS} ms" case_list_is_fast
case_run "an idle daemon: Pss <= ${COST_RSS_KIB} KiB, threads <= serving threads + 2" case_idle_cost
case_run "del -a stops them all in bounded time, leaves nothing" case_del_all_cleans_up
case_run "over the fd limit: refused up front, naming it; a soft limit is raised" case_limits_refused_up_front
summary
