#!/usr/bin/env bash
# What filter stacks cost per request: fio 4k random reads at QD 64 on
# `userblk add null` ublk devices with no filter, one `stats` filter, and
# five pass-through filters (stats, error:rate=0, delay:all=0ms, rate with
# an unreachable limit, offset:offset=0), side by side in one VM boot.
# Prints IOPS (median, min-max), p50 latency and the ratio to no filter.
#
#   bench/filters-overhead.sh [--runtime SECS (15)] [--repeat N (3)] [--results DIR (/tmp/userblk-bench)]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    echo "usage: bench/filters-overhead.sh [--runtime SECS (15)] [--repeat N (3)] [--results DIR (/tmp/userblk-bench)]" >&2
    exit 2
}
RUNTIME=15 REPEAT=3 RESULTS=/tmp/userblk-bench
while (( $# )); do
    case $1 in
        --runtime) (( $# >= 2 )) || usage; RUNTIME=$2; shift 2 ;;
        --repeat) (( $# >= 2 )) || usage; REPEAT=$2; shift 2 ;;
        --results) (( $# >= 2 )) || usage; RESULTS=$2; shift 2 ;;
        *) usage ;;
    esac
done
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || { echo "bench: --runtime wants seconds, not '$RUNTIME'" >&2; exit 2; }
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || { echo "bench: --repeat wants a positive integer, not '$REPEAT'" >&2; exit 2; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bench_build
commit=$(bench_commit)
stamp=$(date +%Y%m%d-%H%M%S)
mkdir -p "$RESULTS"
OUT=$(realpath "$RESULTS")/filters-overhead-$stamp
TIMEOUT=$(( 3 * REPEAT * (RUNTIME + 20) + 300 ))
start=$SECONDS rc=0
USERBLK_VM_LOG=$OUT/console.log vm/run.sh --timeout "$TIMEOUT" --out "$OUT" -- \
    bench/guest/filters-overhead.sh "$OUT" "$RUNTIME" "$REPEAT" || rc=$?
[[ -s $OUT/summary.txt ]] || { echo "bench: no summary from the guest (status $rc); console log: $OUT/console.log" >&2; exit $(( rc ? rc : 1 )); }
{
    echo "filter stack overhead, $(date '+%Y-%m-%d %H:%M'), commit $commit, qemu TCG, $(( SECONDS - start ))s"
    echo
    cat "$OUT/summary.txt"
} | tee "$OUT.txt"
echo "bench: saved $OUT.txt (raw fio JSON and env in $OUT/)" >&2
exit "$rc"
