#!/usr/bin/env bash
# In the VM (see bench/io-mode.sh): per-tag against batch I/O on one null
# device and one file device (over 1 GiB of written tmpfs pages) each, in
# this boot: fio 4k random reads at QD 64 and 128 KiB sequential reads at
# QD 8, the modes' order rotated each round. Writes runs.csv and
# summary.txt (medians, min-max, batch/per-tag) to OUT.
#
#   bench/guest/io-mode.sh OUT RUNTIME REPEAT USERBLK
set -euo pipefail
OUT=$1 RUNTIME=$2 REPEAT=$3 UB=$4
[ -e /dev/ublk-control ] || modprobe ublk_drv
"$UB" features | grep -q BATCH_IO || { echo "this kernel lacks BATCH_IO" >"$OUT/summary.txt"; exit 1; }
"$UB" del -a >/dev/null 2>&1 || true
WORKLOADS=("rand4k-qd64|--rw=randread --bs=4k --iodepth=64" "seq128k-qd8|--rw=read --bs=128k --iodepth=8")
# /run is a plain tmpfs in the VM; written pages, so reads are not holes.
BACKING=/run/io-mode-backing.img
dd if=/dev/zero of="$BACKING" bs=1M count=1024 status=none
TARGETS=("null|null --size 16G" "file|file -f $BACKING")
echo "round,mode,workload,iops" >"$OUT/runs.csv"
for round in $(seq 1 "$REPEAT"); do
    modes=(per-tag batch)
    [ $((round % 2)) = 1 ] || modes=(batch per-tag)
    for mode in "${modes[@]}"; do
        for t in "${TARGETS[@]}"; do
            # shellcheck disable=SC2086 # the target's arguments split on purpose
            id=$("$UB" add --io-mode "$mode" ${t#*|} | sed -n 's/^dev id \([0-9]*\):.*/\1/p')
            "$UB" list -n "$id" | grep -q "io mode $mode" || { echo "device $id is not $mode" >&2; exit 1; }
            for w in "${WORKLOADS[@]}"; do
                # shellcheck disable=SC2086 # the job's options split on purpose
                iops=$(fio --name=b --filename="/dev/ublkb$id" --ioengine=io_uring --direct=1 \
                    --time_based --runtime="$RUNTIME" --ramp_time=2 ${w#*|} --output-format=json |
                    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
                echo "$round,$mode,${t%%|*}-${w%%|*},$iops" | tee -a "$OUT/runs.csv"
            done
            "$UB" del -n "$id"
        done
    done
done
rm -f "$BACKING"
python3 - "$OUT/runs.csv" >"$OUT/summary.txt" <<'PY'
import csv, statistics, sys
runs = {}
for r in csv.DictReader(open(sys.argv[1])):
    runs.setdefault((r["workload"], r["mode"]), []).append(int(r["iops"]))
for w in sorted({w for w, _ in runs}):
    p, b = runs.get((w, "per-tag"), [0]), runs.get((w, "batch"), [0])
    mp, mb = statistics.median(p), statistics.median(b)
    ratio = mb / mp if mp else float("nan")
    print(f"{w:18} per-tag {mp:>8.0f} ({min(p)}-{max(p)})  batch {mb:>8.0f} ({min(b)}-{max(b)})  batch/per-tag {ratio:.2f}x")
PY
cat "$OUT/summary.txt"
