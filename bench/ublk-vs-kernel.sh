#!/usr/bin/env bash
# userblk vs. the kernel's own drivers, side by side in one VM boot:
#   4k randread QD64 on `userblk add null` vs null_blk,
#   4k randrw 50/50 QD64 on `userblk add file` vs loop (direct I/O), same tmpfs file.
# Run on the host (needs vm/setup.sh done once). See bench/README.md.
#
#   bench/ublk-vs-kernel.sh [--runtime SECS] [--repeat N] [--results DIR]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    echo "usage: bench/ublk-vs-kernel.sh [--runtime SECS (20)] [--repeat N (3)] [--results DIR (/tmp/userblk-bench)]" >&2
    exit 2
}

RUNTIME=20 REPEAT=3 RESULTS=/tmp/userblk-bench
while (( $# )); do
    case $1 in
        --runtime) (( $# >= 2 )) || usage; RUNTIME=$2; shift 2 ;;
        --repeat) (( $# >= 2 )) || usage; REPEAT=$2; shift 2 ;;
        --results) (( $# >= 2 )) || usage; RESULTS=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "bench: unknown argument $1" >&2; usage ;;
    esac
done
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || { echo "bench: --runtime wants seconds, not '$RUNTIME'" >&2; exit 2; }
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || { echo "bench: --repeat wants a positive integer, not '$REPEAT'" >&2; exit 2; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bench_build

# Only a missing binary is built; a stale one is measured as is, but said so.
# (Sources of the binary only: tests and benches do not change it.)
bench_stale target/release/userblk
commit=$(bench_commit)

# The VM needs both host cores (fio on one vCPU, the userblk daemon on the
# other), so anything else running skews the figures, against userblk more
# than against the kernel drivers. Host CPU time (steal included) minus our
# own children's says how much others took during the run; other sessions'
# processes may be invisible here, /proc/stat is not.
if pgrep -f "^[^ ]*qemu-system-x86_64 " >/dev/null; then
    echo "bench: warning: another qemu-system-x86_64 is running; figures will be noisy" >&2
fi

stamp=$(date +%Y%m%d-%H%M%S)
mkdir -p "$RESULTS"
RESULTS=$(realpath "$RESULTS")
OUT=$RESULTS/ublk-vs-kernel-$stamp
REPORT=$RESULTS/ublk-vs-kernel-$stamp.txt
# 4 fio runs per repeat, each RUNTIME plus fio start-up; plus boot and setup.
TIMEOUT=$(( 4 * REPEAT * (RUNTIME + 30) + 300 ))

start=$SECONDS busy0=$(cpu_busy) ours0=$(children_cpu)
rc=0
USERBLK_VM_LOG=$OUT/console.log vm/run.sh --timeout "$TIMEOUT" --out "$OUT" -- \
    bench/guest/ublk-vs-kernel.sh "$OUT" "$RUNTIME" "$REPEAT" || rc=$?
wall=$(( SECONDS - start ))
# Percent of one core used by others, averaged over the run.
others=$(others_pct "$busy0" "$ours0" "$start")
if (( others > 10 )); then
    echo "bench: warning: other host processes used ${others}% of a core during the run; figures are skewed" >&2
fi

if [[ ! -s $OUT/summary.txt ]]; then
    echo "bench: no summary from the guest (status $rc); console log: $OUT/console.log" >&2
    exit $(( rc ? rc : 1 ))
fi
{
    echo "userblk vs kernel, $(date '+%Y-%m-%d %H:%M') on $(hostname) ($(nproc) host cores, qemu TCG)"
    echo "commit at start: $commit${stale:+; binary older than $stale}"
    echo "wall time ${wall}s (runtime ${RUNTIME}s x repeat $REPEAT); guest status $rc;" \
        "host CPU used by others meanwhile: ${others}% of one core"
    echo "raw fio JSON, env, dmesg, console log: $OUT/"
    echo
    cat "$OUT/summary.txt"
} >"$REPORT"
echo
cat "$REPORT"
echo
echo "bench: saved $REPORT" >&2
exit "$rc"
