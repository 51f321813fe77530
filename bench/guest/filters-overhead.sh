#!/usr/bin/env bash
# Guest side of bench/filters-overhead.sh: runs inside the VM (vm/run.sh), as
# root, from the repository root. Measures what filter stacks cost per
# request on a `null` ublk device, all devices in the same boot.
#
#   bash bench/guest/filters-overhead.sh OUT RUNTIME REPEAT
#
# USERBLK overrides the binary (default: this checkout's release build).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(( $# == 3 )) || die "usage: $0 OUT RUNTIME REPEAT"
OUT=$1 RUNTIME=$2 REPEAT=$3
guest_init "$OUT" "$RUNTIME" "$REPEAT" userblk

WORK=/run/userblk-filters-bench
guest_private_userblk "$WORK"
export USERBLK_STATE_DIR=$WORK/state

UB_IDS=()
trap 'guest_cleanup "$USERBLK" "${UB_IDS[@]}"' EXIT

# The stacks, by name. "five" is five filters that let every request through
# unchanged, so what it measures is the cost of the layers themselves.
NAMES=(none stats five)
declare -A STACK=(
    [none]=""
    [stats]="--filter stats:file=$WORK/stats.json"
    [five]="--filter stats:file=$WORK/stats5.json --filter error:rate=0 --filter delay:all=0ms --filter rate:iops=1000000000 --filter offset:offset=0"
)
declare -A DEV=()
for n in "${NAMES[@]}"; do
    # shellcheck disable=SC2086 # the stack is a list of words
    out=$("$USERBLK" add null -q 1 -d 128 ${STACK[$n]})
    echo "$out"
    id=$(sed -n '1s/^dev id \([0-9]*\):.*/\1/p' <<<"$out")
    [[ -n $id && -b /dev/ublkb$id ]] || { echo "userblk add null ${STACK[$n]} gave no live device" >&2; exit 1; }
    UB_IDS+=("$id")
    DEV[$n]=ublkb$id
    echo none >"/sys/block/ublkb$id/queue/scheduler"
done

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "kernel: $(uname -r); cpus: $(nproc)"
    echo "userblk: $("$USERBLK" --version), sha256 $(sha256sum <"$USERBLK" | cut -c1-16); $(fio --version)"
    echo "runtime: ${RUNTIME}s x $REPEAT repeats per stack, rotating order"
    for n in "${NAMES[@]}"; do echo "$n: /dev/${DEV[$n]}: userblk add null -q 1 -d 128 ${STACK[$n]}"; done
} >"$OUT/env.txt"
cat "$OUT/env.txt"

JOB=(--ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=64 --numjobs=1
     --time_based --runtime="$RUNTIME" --norandommap --randrepeat=0 --group_reporting
     --output-format=json)
echo "fio ${JOB[*]} --name=N --filename=/dev/DEV" >"$OUT/commands.txt"
for (( r = 0; r < REPEAT; r++ )); do
    # Rotate which stack goes first, so drift hits them all alike.
    for (( i = 0; i < ${#NAMES[@]}; i++ )); do
        n=${NAMES[$(( (i + r) % ${#NAMES[@]} ))]}
        echo "repeat $(( r + 1 ))/$REPEAT: $n" >&2
        fio "${JOB[@]}" --name="$n" --filename="/dev/${DEV[$n]}" --output="$OUT/raw/$n.$r.json" >/dev/null
    done
done

python3 - "$OUT" "$REPEAT" "${NAMES[@]}" >"$OUT/summary.txt" <<'PY'
import json, statistics, sys
out, repeat, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
iops = {n: [json.load(open(f"{out}/raw/{n}.{r}.json"))["jobs"][0]["read"]["iops"] for r in range(repeat)] for n in names}
p50 = {n: statistics.median(json.load(open(f"{out}/raw/{n}.{r}.json"))["jobs"][0]["read"]["clat_ns"]["percentile"]["50.000000"] / 1000 for r in range(repeat)) for n in names}
base = statistics.median(iops["none"])
print(f"{'stack':8} {'IOPS median (min-max)':>28} {'p50 us':>8} {'vs none':>8} {'paired':>8}  per repeat")
for n in names:
    m = statistics.median(iops[n])
    # Within one repeat the stacks run back to back: their ratio drifts less.
    pairs = [iops[n][r] / iops["none"][r] for r in range(repeat)]
    per = " ".join(f"{p:.2f}" for p in pairs)
    print(f"{n:8} {m:12.0f} ({min(iops[n]):.0f}-{max(iops[n]):.0f}) {p50[n]:8.0f} {m / base:8.3f} {statistics.median(pairs):8.3f}  {per}")
print("4k random read, QD 64, one job, io_uring, direct, on `userblk add null -q 1 -d 128`;")
print("vs none = median IOPS / median IOPS with no filter (1.000 = free); paired =")
print("median over the repeats of this stack's IOPS / no filter's in the same repeat.")
PY
cat "$OUT/summary.txt"
