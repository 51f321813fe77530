#!/usr/bin/env bash
# Time per add/del cycle of a null device, userblk against rublk, in one VM
# boot (bench/guest/churn.sh): p50 and p99 per cycle and their ratio.
# Run on the host (needs vm/setup.sh done once). See bench/README.md.
#
#   bench/churn.sh [--cycles N (1000)] [--results DIR (/tmp/userblk-bench)]
#
# environment: RUBLK (rublk binary, default /opt/rublk/bin/rublk, installed
# with cargo if missing), RUBLK_VERSION (what to install, default 0.2.15),
# USERBLK_VM_CACHE (another VM kernel, e.g. one set up with USERBLK_VM_KSUITE).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { echo "usage: bench/churn.sh [--cycles N (1000)] [--results DIR (/tmp/userblk-bench)]" >&2; exit 2; }
CYCLES=1000 RESULTS=/tmp/userblk-bench
while (( $# )); do
    case $1 in
        --cycles) (( $# >= 2 )) || usage; CYCLES=$2; shift 2 ;;
        --results) (( $# >= 2 )) || usage; RESULTS=$2; shift 2 ;;
        *) usage ;;
    esac
done
[[ $CYCLES =~ ^[1-9][0-9]*$ ]] || die "--cycles must be a positive integer"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing: run vm/setup.sh (as root) first"

bench_rublk
bench_userblk
mkdir -p "$RESULTS"
OUT=$(realpath "$RESULTS")/churn-$(date +%Y%m%d-%H%M%S)
mkdir "$OUT"
# Under TCG a cycle takes 1-3 s per server; boot and set-up on top.
TIMEOUT=$(( CYCLES * 2 * 10 + 600 ))
echo "bench: $CYCLES cycles each of userblk and rublk null devices; expect about $(( (CYCLES * 2 * 2 + 60 + 59) / 60 )) minutes; results in $OUT" >&2

start=$SECONDS busy0=$(cpu_busy) ours0=$(children_cpu)
rc=0
USERBLK_VM_LOG=$OUT/console.log vm/run.sh --timeout "$TIMEOUT" --out "$OUT" -- \
    bench/guest/churn.sh "$OUT" "$CYCLES" "$RUBLK" || rc=$?
others=$(others_pct "$busy0" "$ours0" "$start")
[[ -s $OUT/summary.txt ]] || { echo "bench: no summary from the guest (status $rc); console log: $OUT/console.log" >&2; exit $(( rc ? rc : 1 )); }
{
    echo "add/del churn, userblk vs rublk, commit $commit${stale:+ (binary older than $stale)}"
    echo "wall time $(( SECONDS - start ))s; guest status $rc; host CPU used by others meanwhile: ${others}% of one core"
    echo
    cat "$OUT/summary.txt"
} | tee "$OUT.txt"
exit "$rc"
