#!/usr/bin/env bash
# Guest side of bench/ublk-vs-kernel.sh: runs inside the VM (vm/run.sh), as
# root, from the repository root. Measures userblk against the kernel's own
# drivers in the same boot and writes raw fio JSON plus a summary to OUT.
#
#   bash bench/guest/ublk-vs-kernel.sh OUT RUNTIME REPEAT
#
# USERBLK overrides the binary (default: this checkout's release build).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(( $# == 3 )) || die "usage: $0 OUT RUNTIME REPEAT"
OUT=$1 RUNTIME=$2 REPEAT=$3
guest_init "$OUT" "$RUNTIME" "$REPEAT" userblk

# /run is a plain tmpfs in the VM (/tmp is an overlay), so the backing file
# lives in RAM and neither side pays for a real disk.
WORK=/run/userblk-bench
BACKING=$WORK/backing.img
BACKING_MIB=1024

UB_IDS=() LOOPDEV='' NULLBLK=''
# Serve from a private copy (env.txt names exactly what was measured).
guest_private_userblk "$WORK"
cleanup() {
    local rc=$? bad=0 id
    guest_del "$USERBLK" "${UB_IDS[@]}" || bad=1
    if [[ -n $LOOPDEV ]]; then losetup -d "$LOOPDEV" || { echo "cleanup: losetup -d $LOOPDEV failed" >&2; bad=1; }; fi
    if [[ -n $NULLBLK ]]; then rmmod null_blk || { echo "cleanup: rmmod null_blk failed" >&2; bad=1; }; fi
    rm -rf "$WORK"
    # A leftover device is a failure too, but never hides an earlier one.
    (( rc == 0 && bad )) && rc=1
    exit "$rc"
}
trap cleanup EXIT

# `ub_add VAR ARGS...`: `userblk add ARGS...`, the new id into VAR (not via
# $(...): the id must reach UB_IDS in this shell for cleanup).
ub_add() {
    local var=$1 out id; shift
    out=$("$USERBLK" add "$@")
    echo "$out"
    id=$(sed -n '1s/^dev id \([0-9]*\):.*/\1/p' <<<"$out")
    [[ -n $id && -b /dev/ublkb$id ]] || { echo "userblk add $* gave no live device" >&2; return 1; }
    UB_IDS+=("$id")
    printf -v "$var" %s "$id"
}

# Same elevator on every device: ublk defaults to mq-deadline (one hw queue)
# while loop defaults to none; an I/O scheduler would measure itself, not the
# driver, so all devices run with none.
no_sched() {
    echo none >"/sys/block/$1/queue/scheduler"
    grep -q '\[none\]' "/sys/block/$1/queue/scheduler" || { echo "$1: cannot set scheduler none" >&2; return 1; }
}

# One line per device: the settings that must match for a fair comparison.
describe_dev() {
    local q=/sys/block/$1/queue
    printf '%-8s hw_queues=%s nr_requests=%s scheduler=%s logical_block=%s max_sectors_kb=%s write_cache="%s"\n' \
        "$1" "$(find "/sys/block/$1/mq" -mindepth 1 -maxdepth 1 | wc -l)" "$(cat "$q"/nr_requests)" \
        "$(sed 's/.*\[\(.*\)\].*/\1/' "$q"/scheduler)" "$(cat "$q"/logical_block_size)" \
        "$(cat "$q"/max_sectors_kb)" "$(cat "$q"/write_cache)"
}

# ---- devices -----------------------------------------------------------------

# userblk: one queue, depth 128 (its defaults, spelled out).
ub_add UB_NULL null -q 1 -d 128

# null_blk shaped like `userblk add null`: blk-mq (queue_mode=2), one submit
# queue of depth 128, 250 GiB of 512-byte blocks, not memory backed, and no
# extra poll queue (null_blk adds one by default; fio here never polls).
# irqmode=0 completes each request inline in the submitter's context: no
# timer or softirq, so null_blk is the block layer's floor and the ratio says
# how much of that rate the ublk round trip to userspace keeps.
modprobe null_blk nr_devices=1 queue_mode=2 submit_queues=1 poll_queues=0 \
    hw_queue_depth=128 irqmode=0 bs=512 gb=250 memory_backed=0
NULLBLK=1
for _ in $(seq 50); do [[ -b /dev/nullb0 ]] && break; sleep 0.1; done
[[ -b /dev/nullb0 ]] || { echo "null_blk loaded but /dev/nullb0 is missing" >&2; exit 1; }

# Real pages (dd, not a sparse file or fallocate), so every read copies data.
dd if=/dev/zero of="$BACKING" bs=1M count=$BACKING_MIB status=none
ub_add UB_FILE file -f "$BACKING" -q 1 -d 128
"$USERBLK" list -n "$UB_FILE" | grep -q '"direct":true' \
    || { "$USERBLK" list -n "$UB_FILE" >&2; echo "userblk file target is not using O_DIRECT" >&2; exit 1; }
# loop over the same file, direct I/O (the kernel's equivalent of userblk's
# O_DIRECT default; loop's own queue is also 1 x 128).
LOOPDEV=$(losetup --direct-io=on -f --show "$BACKING")
LOOP=${LOOPDEV#/dev/}
[[ $(cat "/sys/block/$LOOP/loop/dio") == 1 ]] || { echo "$LOOPDEV did not enable direct I/O" >&2; exit 1; }

for d in "ublkb$UB_NULL" nullb0 "ublkb$UB_FILE" "$LOOP"; do no_sched "$d"; done

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "kernel: $(uname -r); cpus: $(nproc); mem: $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
    echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
    echo "clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
    echo "userblk: $("$USERBLK" --version), sha256 $(sha256sum <"$USERBLK" | cut -c1-16), built $(date -u -r "$USERBLK" '+%Y-%m-%d %H:%M:%S UTC'); $(fio --version)"
    echo "runtime: ${RUNTIME}s x $REPEAT repeats per device; backing file: ${BACKING_MIB} MiB in tmpfs ($BACKING)"
    echo "null_blk: $(for p in queue_mode submit_queues poll_queues hw_queue_depth irqmode bs gb memory_backed; do
        printf '%s=%s ' "$p" "$(cat /sys/module/null_blk/parameters/$p)"; done)"
    for d in "ublkb$UB_NULL" nullb0 "ublkb$UB_FILE" "$LOOP"; do describe_dev "$d"; done
} >"$OUT/env.txt"
cat "$OUT/env.txt"

# ---- runs --------------------------------------------------------------------

# The same fio job for both sides of a workload; only --filename differs.
# --norandommap: no block-coverage bitmap (250 GiB of it on the null
# devices), only the random offsets; --eta=never keeps the console readable.
FIO_COMMON=(--ioengine=io_uring --direct=1 --bs=4k --iodepth=64 --numjobs=1
    --time_based --runtime="$RUNTIME" --norandommap --randrepeat=0 --eta=never
    --output-format=json)
declare -A FIO_RW=([null]="--rw=randread" [file]="--rw=randrw --rwmixread=50")
declare -A DEV_UB=([null]="/dev/ublkb$UB_NULL" [file]="/dev/ublkb$UB_FILE")
declare -A DEV_K=([null]=/dev/nullb0 [file]=$LOOPDEV)
# key, table title, kernel label (read by summarize.py).
printf '%s\t%s\t%s\n' null "4k randread QD64 null" null_blk file "4k randrw QD64 file" "loop dio" >"$OUT/workloads.tsv"

: >"$OUT/commands.txt"
for w in null file; do
    for side in userblk kernel; do
        if [[ $side == userblk ]]; then dev=${DEV_UB[$w]}; else dev=${DEV_K[$w]}; fi
        echo "fio --name=$w-$side --filename=$dev ${FIO_RW[$w]} ${FIO_COMMON[*]} --output=FILE" >>"$OUT/commands.txt"
    done
done

# Busy and total jiffies of all guest CPUs. IOPS alone hide where the work
# went: fio saturates its vCPU either way, and userblk's queue thread runs on
# the other one, so CPU time per I/O is reported next to the IOPS.
cpu_jiffies() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }

FAILED=0
run_fio() { # run_fio WORKLOAD SIDE REP
    local w=$1 side=$2 rep=$3 dev json rc=0 c0 c1
    if [[ $side == userblk ]]; then dev=${DEV_UB[$w]}; else dev=${DEV_K[$w]}; fi
    json=$OUT/raw/$w.$side.$rep.json
    c0=$(cpu_jiffies)
    # A wedged device must not eat the VM's whole timeout.
    # shellcheck disable=SC2086  # FIO_RW holds several words on purpose
    timeout -k 10 $((RUNTIME + 60)) fio --name="$w-$side" --filename="$dev" ${FIO_RW[$w]} \
        "${FIO_COMMON[@]}" --output="$json" || rc=$?
    c1=$(cpu_jiffies)
    # "busy total" jiffies (USER_HZ) spent by all guest CPUs during the run.
    echo "$(( ${c1% *} - ${c0% *} )) $(( ${c1#* } - ${c0#* } )) $(getconf CLK_TCK)" >"${json%.json}.cpu"
    if (( rc != 0 )); then
        echo "FAIL fio $w/$side rep $rep: exit $rc" >&2
        # fio's own error lines, not the whole JSON (it stays in raw/).
        grep -a -E '^fio:|"error"' "$json" >&2 2>/dev/null || true
        FAILED=1
        return 0
    fi
    printf 'run %-4s %-7s rep %d: %s\n' "$w" "$side" "$rep" \
        "$(python3 bench/guest/summarize.py --iops "$json")"
}

for rep in $(seq "$REPEAT"); do
    for w in null file; do
        # ABBA order (userblk first on odd repeats, kernel first on even):
        # slow drift in the guest (page cache, TCG code cache, host load)
        # then falls on both sides alike.
        if (( rep % 2 )); then
            run_fio "$w" userblk "$rep"; run_fio "$w" kernel "$rep"
        else
            run_fio "$w" kernel "$rep"; run_fio "$w" userblk "$rep"
        fi
    done
done

# Daemon logs: a panic or I/O error there would explain an odd figure.
for id in "${UB_IDS[@]}"; do
    if [[ -s /run/userblk/$id.log ]]; then cp "/run/userblk/$id.log" "$OUT/userblk-$id.log"; fi
done
dmesg >"$OUT/dmesg.txt"

python3 bench/guest/summarize.py "$OUT" | tee "$OUT/summary.txt"
(( FAILED == 0 )) || { echo "some fio runs failed (see above)" >&2; exit 1; }
