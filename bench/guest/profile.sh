#!/usr/bin/env bash
# Guest side of bench/profile.sh: where a 4k random read's time goes, per
# device, on the running kernel. For userblk null, rublk null (if given) and
# null_blk (shaped alike: 1 queue of depth 128, irqmode=0): one fio run
# alone for IOPS, then the same run under `perf record -a -g`, and the top
# kernel and user symbols of each into OUT/DEVICE.top.txt.
#
#   bash bench/guest/profile.sh OUT RUNTIME [RUBLK] [FIO ARGS...]
#
# Default job: 4k randread at QD64 (the 7.x regression of issue #21).
set -euo pipefail
usage() { echo "usage: $0 OUT RUNTIME [RUBLK|-] [FIO ARGS...]" >&2; exit 2; }
(( $# >= 2 )) || usage
OUT=$1 RUNTIME=$2 RUBLK=${3:--}
shift $(( $# >= 3 ? 3 : 2 ))
JOB=("$@")
(( ${#JOB[@]} )) || JOB=(--rw=randread --bs=4k --iodepth=64)
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || usage
cd "$(dirname "$0")/../.."
: "${USERBLK:=$PWD/target/release/userblk}"
for tool in fio perf modprobe; do
    command -v "$tool" >/dev/null || { echo "$tool is missing in the guest" >&2; exit 2; }
done
mkdir -p "$OUT"
WORK=/run/userblk-profile
mkdir -p "$WORK"
cp -p "$USERBLK" "$WORK/userblk"
USERBLK=$WORK/userblk
export USERBLK_STATE_DIR=$WORK/state
NULLB=/sys/kernel/config/nullb/prof
UB_ID='' RB_ID=''
cleanup() {
    local rc=$?
    [[ -z $UB_ID ]] || "$USERBLK" del -n "$UB_ID" || rc=1
    [[ -z $RB_ID ]] || "$RUBLK" del -n "$RB_ID" || rc=1
    if [[ -d $NULLB ]]; then echo 0 >"$NULLB/power"; rmdir "$NULLB" || rc=1; fi
    exit "$rc"
}
trap cleanup EXIT

dev_of() { sed -n 's/^dev id \([0-9]*\):.*/\1/p' | head -n1; }
UB_ID=$("$USERBLK" add null -q 1 -d 128 | dev_of)
DEVS=("userblk:/dev/ublkb$UB_ID")
if [[ $RUBLK != - ]]; then
    cp -p "$RUBLK" "$WORK/rublk"
    RUBLK=$WORK/rublk
    RB_ID=$("$RUBLK" add null -q 1 -d 128 | dev_of)
    DEVS+=("rublk:/dev/ublkb$RB_ID")
fi
modprobe null_blk nr_devices=0
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
mkdir "$NULLB"
for kv in queue_mode=2 submit_queues=1 poll_queues=0 hw_queue_depth=128 irqmode=0 \
    blocksize=512 size=256000 memory_backed=0 max_sectors=1024 power=1; do
    echo "${kv#*=}" >"$NULLB/${kv%%=*}"
done
for _ in $(seq 50); do [[ -b /dev/prof ]] && break; sleep 0.1; done
DEVS+=("null_blk:/dev/prof")
for d in "${DEVS[@]}"; do [[ -b ${d#*:} ]] || { echo "${d#*:} did not appear" >&2; exit 1; }; done
# PROFILE_SCHED=none: the same I/O scheduler on every device.
if [[ -n ${PROFILE_SCHED:-} ]]; then
    for d in "${DEVS[@]}"; do echo "$PROFILE_SCHED" >"/sys/block/${d#*:/dev/}/queue/scheduler"; done
fi

echo "kernel $(uname -r); job: ${JOB[*]}; runtime ${RUNTIME}s" | tee "$OUT/summary.txt"
fio_run() {  # DEV
    fio --name=p --filename="$1" --ioengine=io_uring --direct=1 --time_based --runtime="$RUNTIME" \
        --norandommap --randrepeat=0 --numjobs=1 "${JOB[@]}" --output-format=terse --terse-version=3 \
        | awk -F';' '{print $8}'
}
for d in "${DEVS[@]}"; do
    name=${d%%:*} dev=${d#*:}
    iops=$(fio_run "$dev")
    perf record -q -a ${PROFILE_KERNEL_ONLY:+--all-kernel} -g -F 997 -o "$WORK/$name.data" -- fio --name=p --filename="$dev" --ioengine=io_uring \
        --direct=1 --time_based --runtime="$RUNTIME" --norandommap --randrepeat=0 "${JOB[@]}" \
        --output-format=terse >/dev/null 2>"$WORK/$name.perf.err" || cat "$WORK/$name.perf.err" >&2
    perf report -q -i "$WORK/$name.data" --no-children --sort sym --percent-limit 0.7 --stdio -g none \
        2>/dev/null | sed '/^$/d' | head -n 60 >"$OUT/$name.top.txt" || true
    perf report -q -i "$WORK/$name.data" --no-children --sort comm,dso --stdio -g none \
        2>/dev/null | sed '/^$/d' | head -n 20 >"$OUT/$name.dso.txt" || true
    for sym in ${PROFILE_SYMS:-}; do
        echo "--- callers of $sym"
        perf report -q -i "$WORK/$name.data" --no-children -S "$sym" -g graph,0.5,callee --stdio 2>/dev/null \
            | sed '/^$/d' | head -n 40 || true
    done >"$OUT/$name.callers.txt"
    printf '%-9s %s IOPS (scheduler: %s)\n' "$name" "$iops" \
        "$(cat "/sys/block/${dev#/dev/}/queue/scheduler" 2>/dev/null)" | tee -a "$OUT/summary.txt"
done
for d in "${DEVS[@]}"; do
    name=${d%%:*}
    echo "=== $name: by command and object"; cat "$OUT/$name.dso.txt"
    echo "=== $name: top symbols"; head -n 35 "$OUT/$name.top.txt"
    cat "$OUT/$name.callers.txt"
done
