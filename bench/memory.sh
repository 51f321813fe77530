#!/usr/bin/env bash
# Daemon memory per device (RSS, peak, locked) for userblk null/mem/file and
# rublk null, idle and after every request buffer was used, at the default
# depth 128 and 512 KiB buffers, with 1 and 2 queues; one VM boot.
#
#   bench/memory.sh [--results DIR (/tmp/userblk-bench)]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RESULTS=/tmp/userblk-bench
while (( $# )); do
    case $1 in
        --results) (( $# >= 2 )) || { echo "usage: bench/memory.sh [--results DIR]" >&2; exit 2; }; RESULTS=$2; shift 2 ;;
        *) echo "usage: bench/memory.sh [--results DIR]" >&2; exit 2 ;;
    esac
done
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bench_build
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
mkdir -p "$RESULTS"
OUT=$(realpath "$RESULTS")/memory-$(date +%Y%m%d-%H%M%S)
rc=0
USERBLK_VM_LOG=$OUT/console.log vm/run.sh --timeout 900 --out "$OUT" -- bench/guest/memory.sh "$OUT" || rc=$?
[[ -s $OUT/summary.txt ]] || { echo "bench: no summary from the guest (status $rc); console log: $OUT/console.log" >&2; exit $(( rc ? rc : 1 )); }
{ echo "daemon memory per device, commit $commit"; echo; cat "$OUT/summary.txt"; } | tee "$OUT.txt"
exit "$rc"
