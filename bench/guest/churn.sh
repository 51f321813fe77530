#!/usr/bin/env bash
# Guest side of bench/churn.sh: runs inside the VM (vm/run.sh), as root,
# from the repository root. CYCLES add/del cycles of a null device (1
# queue, depth 128) with userblk and with rublk, interleaved in one boot:
# each round does one cycle of each, the order rotating every round, so
# drift hits both alike. A cycle is `add` until it returns and
# /dev/ublkbN exists, then `del` until it returns. Writes OUT/raw.txt
# (server, cycle, ns) and OUT/summary.txt (p50, p99, mean, max; ratio).
#
#   bash bench/guest/churn.sh OUT CYCLES RUBLK
#
# USERBLK overrides the binary (default: this checkout's release build).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(( $# == 3 )) || die "usage: $0 OUT CYCLES RUBLK"
OUT=$1 CYCLES=$2 RUBLK=$3
[[ $CYCLES =~ ^[1-9][0-9]*$ ]] || die "CYCLES must be a positive integer"
[[ -x $RUBLK ]] || die "no rublk binary at $RUBLK"
cd "$(dirname "$0")/../.."
guest_userblk
mkdir -p "$OUT"

WORK=/run/userblk-churn-bench
guest_private_userblk "$WORK"
cp -p "$RUBLK" "$WORK/rublk"
RUBLK=$WORK/rublk
export USERBLK_STATE_DIR=$WORK/state
modprobe ublk_drv

LIVE=()  # devices to delete if the script stops half-way: "BIN ID"
cleanup() {
    local rc=$? d
    for d in "${LIVE[@]}"; do
        # shellcheck disable=SC2086 # "BIN ID"
        set -- $d
        "$1" del -n "$2" >/dev/null 2>&1 || { echo "cleanup: $1 del -n $2 failed" >&2; (( rc )) || rc=1; }
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

now_ns() { date +%s%N; }

# One cycle of SERVER (userblk or rublk): its time in ns goes to raw.txt.
cycle() { # cycle SERVER N
    local bin out id t0 t1 i
    if [[ $1 == userblk ]]; then bin=$USERBLK; else bin=$RUBLK; fi
    t0=$(now_ns)
    out=$("$bin" add null -q 1 -d 128 2>&1) || die "$1 add failed in cycle $2: $out"
    id=$(sed -n 's/^dev id \([0-9]*\):.*/\1/p' <<<"$out" | head -n 1)
    [[ -n $id ]] || die "$1 add printed no device id in cycle $2: $out"
    LIVE=("$bin $id")
    for (( i = 0; i < 500; i++ )); do [[ -b /dev/ublkb$id ]] && break; sleep 0.01; done
    [[ -b /dev/ublkb$id ]] || die "$1: /dev/ublkb$id did not appear in cycle $2"
    "$bin" del -n "$id" >/dev/null || die "$1 del -n $id failed in cycle $2"
    t1=$(now_ns)
    LIVE=()
    echo "$1 $2 $(( t1 - t0 ))" >>"$OUT/raw.txt"
    # Untimed: the id must be free before the next cycle.
    for (( i = 0; i < 1000; i++ )); do [[ -e /dev/ublkc$id ]] || break; sleep 0.01; done
    [[ ! -e /dev/ublkc$id ]] || die "$1: /dev/ublkc$id still exists 10 s after del in cycle $2"
}

: >"$OUT/raw.txt"
start=$SECONDS
for (( n = 1; n <= CYCLES; n++ )); do
    if (( n % 2 )); then cycle userblk "$n"; cycle rublk "$n"; else cycle rublk "$n"; cycle userblk "$n"; fi
    (( n % 100 )) || echo "[churn +$(( SECONDS - start ))s] $n of $CYCLES rounds"
done

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); kernel $(uname -r); cpus $(nproc)"
    echo "userblk: $("$USERBLK" --version); rublk: $("$RUBLK" --version)"
    echo "$CYCLES add/del cycles each of a null device (-q 1 -d 128), interleaved, order rotated every round;"
    echo "a cycle: add until it returns and /dev/ublkbN exists, then del until it returns"
    echo
    python3 - "$OUT/raw.txt" <<'EOF'
import math, statistics, sys
times = {}
for line in open(sys.argv[1]):
    server, _, ns = line.split()
    times.setdefault(server, []).append(int(ns) / 1e6)
def pct(xs, p):
    xs = sorted(xs)
    # Nearest rank.
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)]
print(f"{'server':<8} {'cycles':>6} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'max ms':>9}")
row = {}
for server in ("userblk", "rublk"):
    xs = times.get(server, [])
    if not xs:
        continue
    row[server] = (pct(xs, 50), pct(xs, 99))
    print(f"{server:<8} {len(xs):>6} {row[server][0]:>9.1f} {row[server][1]:>9.1f} {statistics.mean(xs):>9.1f} {max(xs):>9.1f}")
if len(row) == 2:
    print(f"userblk/rublk: p50 {row['userblk'][0] / row['rublk'][0]:.2f}x, p99 {row['userblk'][1] / row['rublk'][1]:.2f}x (below 1: userblk is faster)")
EOF
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
