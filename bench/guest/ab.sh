#!/usr/bin/env bash
# Guest side of bench/ab.sh: runs inside the VM (vm/run.sh), as root, from
# the repository root. Two userblk binaries, A and B, side by side in one
# boot: the same fio jobs on a null device and on a file device (over
# tmpfs) of each, the order rotated every repeat.
#
#   bash bench/guest/ab.sh OUT RUNTIME REPEAT BIN_A BIN_B
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(( $# == 5 )) || die "usage: $0 OUT RUNTIME REPEAT BIN_A BIN_B"
OUT=$1 RUNTIME=$2 REPEAT=$3
guest_init "$OUT" "$RUNTIME" "$REPEAT"

WORK=/run/userblk-ab
mkdir -p "$WORK"
declare -A BIN=()
# Private copies: a rebuild on the host must not swap a binary mid-run.
for side in a b; do
    src=$4; [[ $side == b ]] && src=$5
    [[ -x $src ]] || die "no binary at $src"
    cp -p "$src" "$WORK/userblk-$side"
    BIN[$side]=$WORK/userblk-$side
done
export USERBLK_STATE_DIR=$WORK/state

IDS=()
trap 'guest_cleanup "${BIN[a]}" "${IDS[@]}"' EXIT

declare -A DEV=()
add() { # side kind args...
    local side=$1 kind=$2 out id
    shift 2
    out=$("${BIN[$side]}" add "$@")
    id=$(sed -n '1s/^dev id \([0-9]*\):.*/\1/p' <<<"$out")
    [[ -n $id && -b /dev/ublkb$id ]] || { echo "$side: add $* gave no live device" >&2; exit 1; }
    IDS+=("$id")
    DEV[$side-$kind]=ublkb$id
    echo none >"/sys/block/ublkb$id/queue/scheduler"
}
for side in a b; do
    add "$side" null null -q 1 -d 128
    truncate -s 512M "$WORK/$side.img"
    add "$side" file file -f "$WORK/$side.img" -q 1 -d 128
    # Written once, so reads are of data, not holes.
    fio --name=fill --filename="/dev/${DEV[$side-file]}" --rw=write --bs=1M --direct=1 \
        --ioengine=io_uring --iodepth=8 --output=/dev/null
done

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "kernel: $(uname -r); cpus: $(nproc); $(fio --version)"
    for side in a b; do
        echo "$side: $("${BIN[$side]}" --version), sha256 $(sha256sum <"${BIN[$side]}" | cut -c1-16)"
    done
    echo "runtime: ${RUNTIME}s x $REPEAT repeats, order rotated"
} >"$OUT/env.txt"
cat "$OUT/env.txt"

# A "-2j" suffix runs two fio jobs on the device (the 6.12 perf run's file
# randwrite with 2 jobs was the case that looked lower).
WORKLOADS=(null-randread null-randwrite file-randread file-randwrite file-randwrite-2j)
COMMON=(--ioengine=io_uring --direct=1 --bs=4k --iodepth=64 --group_reporting --time_based
        --runtime="$RUNTIME" --norandommap --randrepeat=0 --output-format=json)
echo "fio ${COMMON[*]} --numjobs=1|2 --rw=randread|randwrite --filename=/dev/DEV" >"$OUT/commands.txt"
for (( r = 0; r < REPEAT; r++ )); do
    for w in "${WORKLOADS[@]}"; do
        kind=${w%%-*} rw=${w#*-} jobs=1
        [[ $rw == *-2j ]] && rw=${rw%-2j} jobs=2
        sides=(a b); (( (r + ${#w}) % 2 )) && sides=(b a)
        for side in "${sides[@]}"; do
            echo "repeat $(( r + 1 ))/$REPEAT: $w on $side" >&2
            fio "${COMMON[@]}" --numjobs="$jobs" --name="$w" --rw="$rw" --filename="/dev/${DEV[$side-$kind]}" \
                --output="$OUT/raw/$w.$side.$r.json" >/dev/null
        done
    done
done

python3 - "$OUT" "$REPEAT" "${WORKLOADS[@]}" >"$OUT/summary.txt" <<'PY'
import json, statistics, sys
out, repeat, works = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def iops(w, s, r):
    job = json.load(open(f"{out}/raw/{w}.{s}.{r}.json"))["jobs"][0]
    return job["read" if "read" in w else "write"]["iops"]
print(f"{'workload':16} {'A IOPS median (min-max)':>26} {'B IOPS median (min-max)':>26} {'B/A':>6} {'paired':>7}  per repeat")
for w in works:
    a = [iops(w, "a", r) for r in range(repeat)]
    b = [iops(w, "b", r) for r in range(repeat)]
    pairs = [b[r] / a[r] for r in range(repeat)]
    print(f"{w:18} {statistics.median(a):12.0f} ({min(a):.0f}-{max(a):.0f}) {statistics.median(b):12.0f} ({min(b):.0f}-{max(b):.0f})"
          f" {statistics.median(b) / statistics.median(a):6.3f} {statistics.median(pairs):7.3f}  " + " ".join(f"{p:.2f}" for p in pairs))
print("4k random I/O, QD 64, one job (-2j: two), io_uring, direct; null and file (512 MiB tmpfs file,")
print("written first) devices, -q 1 -d 128. B/A = median B IOPS / median A IOPS;")
print("paired = median over the repeats of B / A within the same repeat.")
PY
cat "$OUT/summary.txt"
