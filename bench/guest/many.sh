#!/usr/bin/env bash
# Guest side of bench/many.sh (and its FUSE half, on the host): N mem 16M
# devices at once. Prints the time to bring them up, `list` and
# `list --json` times, an idle daemon's Rss, Pss and threads (-q 1 for all
# N, then -q 2 for a few more) and the time of `del -a`. As root, from the
# repository root; inside the VM for ublk.
#
#   bash bench/guest/many.sh OUT FRONTEND N      (FRONTEND: ublk or fuse)
#
# USERBLK overrides the binary (default: this checkout's release build);
# MANY_PARALLEL (8) adds run at a time.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(( $# == 3 )) || die "usage: $0 OUT ublk|fuse N"
OUT=$1 FRONTEND=$2 N=$3
[[ $FRONTEND == ublk || $FRONTEND == fuse ]] || die "FRONTEND is ublk or fuse, not '$FRONTEND'"
[[ $N =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer"
cd "$(dirname "$0")/../.."
guest_userblk
. vm/suite/many-lib.sh
mkdir -p "$OUT"

WORK=$(mktemp -d /var/tmp/userblk-many-bench.XXXXXX)
guest_private_userblk "$WORK"
export USERBLK USERBLK_STATE_DIR=$WORK/state
case $FRONTEND in
    ublk) modprobe ublk_drv; FE=(--frontend ublk) ;;
    fuse) [[ ! -e /dev/ublk-control ]] || die "this host has ublk: del -a would reach its devices"
          FE=(--frontend fuse --loop) ;;
esac
cleanup() { "$USERBLK" del -a >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT

pids() { many_list | awk '{print $2}'; }
sum=$OUT/summary-$FRONTEND.txt
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); kernel $(uname -r); cpus $(nproc); $("$USERBLK" --version)"
    echo "frontend $FRONTEND; $N mem 16M devices, ${MANY_PARALLEL:-8} adds at a time; goal: Pss <= 4096 KiB, threads <= queues + 1"
    echo
} >"$sum"

t0=$(ms_now)
many_add "$N" "${FE[@]}" -q 1 mem --size 16M >"$WORK/ids"
up=$(( $(ms_now) - t0 ))
live=$(many_list | grep -c ' LIVE$' || true)
echo "up: $N devices in $up ms ($(( up / N )) ms each); $live LIVE" >>"$sum"
echo "list: $(ms_of "$USERBLK" list) ms; list --json: $(ms_of "$USERBLK" list --json) ms" >>"$sum"
sleep 2
read -r ra rm pa pm tm < <(many_cost $(pids))
echo "idle -q 1: Rss avg $ra KiB (max $rm), Pss avg $pa KiB (max $pm), threads max $tm (queues + $((tm - 1)))" >>"$sum"
t0=$(ms_now)
"$USERBLK" del -a || echo "del -a failed" >>"$sum"
echo "del -a: $(( $(ms_now) - t0 )) ms for $N devices" >>"$sum"

# Two queues: a few devices are enough for the per-device figure.
q2=$(( N < 8 ? N : 8 ))
many_add "$q2" "${FE[@]}" -q 2 mem --size 16M >"$WORK/ids"
sleep 2
read -r ra rm pa pm tm < <(many_cost $(pids))
echo "idle -q 2 ($q2 devices): Rss avg $ra KiB (max $rm), Pss avg $pa KiB (max $pm), threads max $tm" >>"$sum"
"$USERBLK" del -a
left=$(many_list | wc -l)
echo "left after del -a: $left" >>"$sum"
cat "$sum"
