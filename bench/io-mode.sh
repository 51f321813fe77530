#!/usr/bin/env bash
# Per-tag against batch I/O (`--io-mode`) on null and file devices in one VM boot of
# a kernel with UBLK_F_BATCH_IO (7.0+): fio 4k random reads at QD 64 and
# 128 KiB sequential reads at QD 8, order rotated, repeated. Prints medians,
# spread and batch/per-tag. Decides `auto` (ublk/io_mode.rs AUTO_PREFERS_BATCH).
#
#   USERBLK_VM_CACHE=/var/cache/userblk-vm-backports bench/io-mode.sh \
#       [--bin BIN] [--runtime SECS (10)] [--repeat N (3)] [--results DIR]
set -euo pipefail
usage() {
    echo "usage: bench/io-mode.sh [--bin BIN (target/release/userblk)] [--runtime SECS (10)] [--repeat N (3)] [--results DIR (/tmp/userblk-bench)]" >&2
    exit 2
}
BIN="" RUNTIME=10 REPEAT=3 RESULTS=/tmp/userblk-bench
while (( $# )); do
    case $1 in
        --bin) (( $# >= 2 )) || usage; BIN=$2; shift 2 ;;
        --runtime) (( $# >= 2 )) || usage; RUNTIME=$2; shift 2 ;;
        --repeat) (( $# >= 2 )) || usage; REPEAT=$2; shift 2 ;;
        --results) (( $# >= 2 )) || usage; RESULTS=$2; shift 2 ;;
        *) usage ;;
    esac
done
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${BIN:=$PWD/target/release/userblk}"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || { echo "bench: --runtime wants seconds, not '$RUNTIME'" >&2; exit 2; }
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || { echo "bench: --repeat wants a positive integer, not '$REPEAT'" >&2; exit 2; }
[[ -x $BIN ]] || { echo "bench: no executable at $BIN" >&2; exit 2; }
BIN=$(realpath "$BIN")
mkdir -p "$RESULTS"
OUT=$(realpath "$RESULTS")/io-mode-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
rc=0
USERBLK_VM_LOG=$OUT/console.log vm/run.sh --timeout $(( 8 * REPEAT * (RUNTIME + 15) + 600 )) --out "$OUT" -- \
    bench/guest/io-mode.sh "$OUT" "$RUNTIME" "$REPEAT" "$BIN" || rc=$?
[[ -s $OUT/summary.txt ]] || { echo "bench: no summary from the guest (status $rc); console log: $OUT/console.log" >&2; exit $(( rc ? rc : 1 )); }
cat "$OUT/summary.txt"
exit "$rc"
