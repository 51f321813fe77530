#!/usr/bin/env bash
# Many devices at once: N (256) mem 16M devices on ublk in one VM boot and
# over FUSE + loop on this host. Prints the time to bring them up, `list`
# times, an idle daemon's Rss, Pss and threads (-q 1, -q 2) and `del -a`'s
# time (bench/guest/many.sh does the measuring).
#
#   [USERBLK_VM_CACHE=/var/cache/userblk-vm-backports] bench/many.sh \
#       [--devices N (256)] [--frontend ublk|fuse|both (both)] [--results DIR]
#
# The FUSE half runs on this host as root, in a state directory of its own.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
usage() { echo "usage: bench/many.sh [--devices N (256)] [--frontend ublk|fuse|both] [--results DIR (/tmp/userblk-bench)]" >&2; exit 2; }
N=256 FRONTEND=both RESULTS=/tmp/userblk-bench
while (( $# )); do
    case $1 in
        --devices) (( $# >= 2 )) || usage; N=$2; shift 2 ;;
        --frontend) (( $# >= 2 )) || usage; FRONTEND=$2; shift 2 ;;
        --results) (( $# >= 2 )) || usage; RESULTS=$2; shift 2 ;;
        *) usage ;;
    esac
done
[[ $N =~ ^[1-9][0-9]*$ ]] || die "--devices wants a positive integer, not '$N'"
[[ $FRONTEND =~ ^(ublk|fuse|both)$ ]] || usage
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${USERBLK:=}"
if [[ -z $USERBLK ]]; then bench_userblk; USERBLK=$UB; fi
export USERBLK USERBLK_VM_PASSENV="${USERBLK_VM_PASSENV:-CI RUST_BACKTRACE RUST_LOG} USERBLK MANY_PARALLEL"
mkdir -p "$RESULTS"
OUT=$(realpath "$RESULTS")/many-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
rc=0
if [[ $FRONTEND != fuse ]]; then
    # A boot, then about 1 s per device each way under TCG.
    USERBLK_VM_LOG=$OUT/console.log vm/run.sh --timeout $(( 600 + 10 * N )) --out "$OUT" -- \
        bench/guest/many.sh "$OUT" ublk "$N" || rc=$?
    [[ -s $OUT/summary-ublk.txt ]] || { echo "bench: no ublk summary from the guest (status $rc); console log: $OUT/console.log" >&2; (( rc )) || rc=1; }
fi
if [[ $FRONTEND != ublk ]]; then
    bash bench/guest/many.sh "$OUT" fuse "$N" >/dev/null || rc=$?
fi
cat "$OUT"/summary-*.txt 2>/dev/null | tee "$OUT.txt"
exit "$rc"
