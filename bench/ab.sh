#!/usr/bin/env bash
# Two userblk binaries side by side in one VM boot (A: a baseline, e.g. the
# last release or main before a change; B: this checkout's release build):
# fio 4k random reads and writes at QD 64 on null and file devices of each
# (file random writes also with 2 jobs),
# order rotated, repeated. Prints medians, spread and B/A. For "no
# regression" checks of refactors.
#
#   bench/ab.sh --a BIN_A [--b BIN_B] [--runtime SECS (10)] [--repeat N (5)] [--results DIR]
#
# Build a baseline with e.g.:
#   git worktree add /tmp/base REV && cargo build --release --manifest-path /tmp/base/Cargo.toml
set -euo pipefail

usage() {
    echo "usage: bench/ab.sh --a BIN_A [--b BIN_B (target/release/userblk)] [--runtime SECS (10)] [--repeat N (5)] [--results DIR (/tmp/userblk-bench)]" >&2
    exit 2
}
A="" B="" RUNTIME=10 REPEAT=5 RESULTS=/tmp/userblk-bench
while (( $# )); do
    case $1 in
        --a) (( $# >= 2 )) || usage; A=$2; shift 2 ;;
        --b) (( $# >= 2 )) || usage; B=$2; shift 2 ;;
        --runtime) (( $# >= 2 )) || usage; RUNTIME=$2; shift 2 ;;
        --repeat) (( $# >= 2 )) || usage; REPEAT=$2; shift 2 ;;
        --results) (( $# >= 2 )) || usage; RESULTS=$2; shift 2 ;;
        *) usage ;;
    esac
done
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -n $A ]] || usage
: "${B:=$PWD/target/release/userblk}"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || { echo "bench: --runtime wants seconds, not '$RUNTIME'" >&2; exit 2; }
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || { echo "bench: --repeat wants a positive integer, not '$REPEAT'" >&2; exit 2; }
for bin in "$A" "$B"; do
    [[ -x $bin ]] || { echo "bench: no executable at $bin" >&2; exit 2; }
done
A=$(realpath "$A") B=$(realpath "$B")
stamp=$(date +%Y%m%d-%H%M%S)
mkdir -p "$RESULTS"
OUT=$(realpath "$RESULTS")/ab-$stamp
TIMEOUT=$(( 10 * REPEAT * (RUNTIME + 10) + 600 ))
start=$SECONDS rc=0
USERBLK_VM_LOG=$OUT/console.log vm/run.sh --timeout "$TIMEOUT" --out "$OUT" -- \
    bench/guest/ab.sh "$OUT" "$RUNTIME" "$REPEAT" "$A" "$B" || rc=$?
[[ -s $OUT/summary.txt ]] || { echo "bench: no summary from the guest (status $rc); console log: $OUT/console.log" >&2; exit $(( rc ? rc : 1 )); }
{
    echo "A/B: A=$A B=$B, $(date '+%Y-%m-%d %H:%M'), qemu TCG, $(( SECONDS - start ))s"
    echo
    cat "$OUT/summary.txt"
} | tee "$OUT.txt"
echo "bench: saved $OUT.txt (raw fio JSON and env in $OUT/)" >&2
exit "$rc"
