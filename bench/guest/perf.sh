#!/usr/bin/env bash
# Guest side of bench/perf.sh: runs inside the VM (vm/run.sh), as root, from
# the repository root. Sets up userblk, rublk and the kernel's null_blk and
# loop (each shaped alike), runs the same fio jobs on each with the order
# rotated, and writes raw fio JSON plus the devices' settings to OUT. The
# host side summarises (bench/guest/perf_summary.py) and draws the chart.
#
#   bash bench/guest/perf.sh OUT RUNTIME REPEAT RUBLK [ONLY]
#
# RUBLK: the rublk binary. ONLY: an extended regex; only workloads whose key
# matches run (all when empty). USERBLK overrides the userblk binary
# (default: this checkout's release build).
set -euo pipefail

usage() { echo "usage: $0 OUT RUNTIME REPEAT RUBLK [ONLY]" >&2; exit 2; }
(( $# == 4 || $# == 5 )) || usage
OUT=$1 RUNTIME=$2 REPEAT=$3 RUBLK=$4 ONLY=${5:-}
[[ $RUNTIME =~ ^[1-9][0-9]*$ && $REPEAT =~ ^[1-9][0-9]*$ ]] || { echo "RUNTIME and REPEAT must be positive integers" >&2; exit 2; }
cd "$(dirname "$0")/../.."
: "${USERBLK:=$PWD/target/release/userblk}"
[[ -x $USERBLK ]] || { echo "no userblk binary at $USERBLK (cargo build --release first)" >&2; exit 2; }
[[ -x $RUBLK ]] || { echo "no rublk binary at $RUBLK" >&2; exit 2; }
for tool in fio losetup python3 modprobe; do
    command -v "$tool" >/dev/null || { echo "$tool is missing in the guest (vm/setup.sh installs it on the host)" >&2; exit 2; }
done
mkdir -p "$OUT/raw"

# /run is a plain tmpfs in the VM (/tmp is an overlay): the backing file
# lives in RAM, so no side pays for a real disk.
WORK=/run/userblk-perf
BACKING=$WORK/backing.img
BACKING_MIB=1024
NULLB_CFS=/sys/kernel/config/nullb

UB_IDS=() RB_IDS=() NULLB_DIRS=() LOOPDEV='' NULLB_LOADED='' CONFIGFS_MOUNTED=''
# Private copies: a rebuild or reinstall on the host mid-run must not swap a
# binary under a later `add`, and env.txt names exactly what was measured.
mkdir -p "$WORK"
cp -p "$USERBLK" "$WORK/userblk"
cp -p "$RUBLK" "$WORK/rublk"
USERBLK=$WORK/userblk RUBLK=$WORK/rublk
# The bench's userblk devices live in their own state directory.
export USERBLK_STATE_DIR=$WORK/state

# Deletes only what this script made, in reverse order of creation.
cleanup() {
    local rc=$? bad=0 id d
    for id in "${UB_IDS[@]}"; do
        "$USERBLK" del -n "$id" || { echo "cleanup: userblk del -n $id failed" >&2; bad=1; }
    done
    for id in "${RB_IDS[@]}"; do
        "$RUBLK" del -n "$id" || { echo "cleanup: rublk del -n $id failed" >&2; bad=1; }
    done
    if [[ -n $LOOPDEV ]]; then losetup -d "$LOOPDEV" || { echo "cleanup: losetup -d $LOOPDEV failed" >&2; bad=1; }; fi
    for d in "${NULLB_DIRS[@]}"; do
        { echo 0 >"$d/power" && rmdir "$d"; } || { echo "cleanup: cannot remove null_blk device $d" >&2; bad=1; }
    done
    if [[ -n $NULLB_LOADED ]]; then rmmod null_blk || { echo "cleanup: rmmod null_blk failed" >&2; bad=1; }; fi
    if [[ -n $CONFIGFS_MOUNTED ]]; then umount /sys/kernel/config || { echo "cleanup: umount configfs failed" >&2; bad=1; }; fi
    rm -rf "$WORK"
    # A leftover device is a failure too, but never hides an earlier one.
    (( rc == 0 && bad )) && rc=1
    exit "$rc"
}
trap cleanup EXIT
# Progress lines carry the seconds since the script started.
phase() { printf '[perf +%ds] %s\n' "$SECONDS" "$*"; }

: >"$OUT/commands.txt"
# Each setup command goes into commands.txt as run.
record() { printf '%s\n' "$*" >>"$OUT/commands.txt"; }

# `ublk_add TOOL VAR ARGS...`: `TOOL add ARGS...` (userblk or rublk, which
# print the same "dev id N:" first line), the new id into VAR and into the
# tool's cleanup list (not via $(...): the list lives in this shell).
ublk_add() {
    local tool=$1 var=$2 out id bin; shift 2
    if [[ $tool == userblk ]]; then bin=$USERBLK; else bin=$RUBLK; fi
    record "$tool add $*"
    out=$("$bin" add "$@")
    echo "$out"
    id=$(sed -n 's/^dev id \([0-9]*\):.*/\1/p' <<<"$out" | head -n1)
    [[ -n $id ]] || { echo "$tool add $* printed no device id" >&2; return 1; }
    if [[ $tool == userblk ]]; then UB_IDS+=("$id"); else RB_IDS+=("$id"); fi
    local _
    for _ in $(seq 50); do [[ -b /dev/ublkb$id ]] && break; sleep 0.1; done
    [[ -b /dev/ublkb$id ]] || { echo "$tool add $*: /dev/ublkb$id did not appear" >&2; return 1; }
    printf -v "$var" %s "ublkb$id"
}

# `nullb_add VAR NAME QUEUES`: a null_blk device through configfs (module
# parameters apply to every device, configfs lets the 1- and 2-queue devices
# differ), shaped like `userblk add null -q QUEUES -d 128`: blk-mq, QUEUES
# submit queues of depth 128 and no poll queue, 250 GiB (size is in MiB) of
# 512-byte blocks, not memory backed, and 512 KiB requests at most
# (max_sectors, in sectors; the ublk devices' io buffer size). irqmode=0
# completes each request inline in the submitter's context: the block
# layer's floor.
NULLB_ATTRS=(queue_mode=2 submit_queues=QUEUES poll_queues=0 hw_queue_depth=128 irqmode=0
    blocksize=512 size=256000 memory_backed=0 max_sectors=1024)
nullb_add() {
    local var=$1 name=$2 queues=$3 dir=$NULLB_CFS/$2 kv disk _
    mkdir "$dir"
    NULLB_DIRS=("$dir" "${NULLB_DIRS[@]}")
    for kv in "${NULLB_ATTRS[@]}" power=1; do
        kv=${kv/QUEUES/$queues}
        echo "${kv#*=}" >"$dir/${kv%%=*}" || { echo "null_blk $name: cannot set ${kv%%=*}=${kv#*=}" >&2; return 1; }
    done
    record "mkdir $dir; cd $dir; $(for kv in "${NULLB_ATTRS[@]}" power=1; do kv=${kv/QUEUES/$queues}; printf 'echo %s >%s; ' "${kv#*=}" "${kv%%=*}"; done)"
    # 6.12 names the disk after the configfs directory; older kernels nullbN.
    disk=$name
    [[ -e /sys/block/$disk ]] || disk=nullb$(cat "$dir/index")
    for _ in $(seq 50); do [[ -b /dev/$disk ]] && break; sleep 0.1; done
    [[ -b /dev/$disk ]] || { echo "null_blk $name: /dev/$disk did not appear" >&2; return 1; }
    printf -v "$var" %s "$disk"
}

# ---- devices -----------------------------------------------------------------

phase "setting up devices"

# null: userblk, rublk and null_blk, each with 1 and with 2 queues of depth 128.
# USERBLK_BENCH_NULL_ARGS / USERBLK_BENCH_RUBLK_ARGS (bench/perf.sh
# --null-args / --rublk-args): more arguments for userblk's null devices
# and for every rublk device, e.g. --zero-copy and -z.
read -r -a NULL_ARGS <<<"${USERBLK_BENCH_NULL_ARGS:-}"
read -r -a RUBLK_ARGS <<<"${USERBLK_BENCH_RUBLK_ARGS:-}"
ublk_add userblk UB_NULL1 null -q 1 -d 128 "${NULL_ARGS[@]}"
ublk_add userblk UB_NULL2 null -q 2 -d 128 "${NULL_ARGS[@]}"
ublk_add rublk RB_NULL1 null -q 1 -d 128 "${RUBLK_ARGS[@]}"
ublk_add rublk RB_NULL2 null -q 2 -d 128 "${RUBLK_ARGS[@]}"

record "modprobe null_blk nr_devices=0"
modprobe null_blk nr_devices=0
NULLB_LOADED=1
if ! mountpoint -q /sys/kernel/config; then
    record "mount -t configfs configfs /sys/kernel/config"
    mount -t configfs configfs /sys/kernel/config
    CONFIGFS_MOUNTED=1
fi
[[ -d $NULLB_CFS ]] || { echo "null_blk has no configfs directory ($NULLB_CFS)" >&2; exit 1; }
nullb_add K_NULL1 perfnull1 1
nullb_add K_NULL2 perfnull2 2

# file: one backing file of real pages (dd, not a sparse file), shared by
# all six devices; only one of them is used at a time.
record "dd if=/dev/zero of=$BACKING bs=1M count=$BACKING_MIB"
dd if=/dev/zero of="$BACKING" bs=1M count=$BACKING_MIB status=none
phase "backing file written"
# USERBLK_BENCH_FILE_ARGS (bench/perf.sh --file-args): more arguments for
# userblk's file devices, e.g. --zero-copy.
read -r -a FILE_ARGS <<<"${USERBLK_BENCH_FILE_ARGS:-}"
ublk_add userblk UB_FILE1 file -f "$BACKING" -q 1 -d 128 "${FILE_ARGS[@]}"
ublk_add userblk UB_FILE2 file -f "$BACKING" -q 2 -d 128 "${FILE_ARGS[@]}"
for id in "${UB_IDS[@]}"; do
    out=$("$USERBLK" list -n "$id")
    if grep -q '"type":"file"' <<<"$out" && ! grep -q '"direct":true' <<<"$out"; then
        echo "$out" >&2; echo "userblk file target $id is not using O_DIRECT" >&2; exit 1
    fi
done
if [[ " ${FILE_ARGS[*]} " == *" --zero-copy "* ]]; then
    for v in UB_FILE1 UB_FILE2; do
        flags=$("$USERBLK" list -n "${!v#ublkb}" --json | sed -n 's/^ *"flags": *\([0-9]*\),\{0,1\}$/\1/p' | head -n 1)
        (( ${flags:-0} & 0x800 )) || { echo "${!v}: --zero-copy asked for, not granted (flags ${flags:-?})" >&2; exit 1; }
    done
fi
# rublk loop takes its logical block size from the file (4096 on tmpfs);
# userblk's file target and loop use 512, so rublk is told 512 too. rublk
# uses direct I/O by default, like the other two.
ublk_add rublk RB_FILE1 loop -f "$BACKING" -q 1 -d 128 --logical-block-size 512 "${RUBLK_ARGS[@]}"
ublk_add rublk RB_FILE2 loop -f "$BACKING" -q 2 -d 128 --logical-block-size 512 "${RUBLK_ARGS[@]}"
# loop with direct I/O over the same file (one hw queue of depth 128; loop
# has no multi-queue mode, so the 2-job runs use the same device).
record "losetup --direct-io=on -f --show $BACKING"
LOOPDEV=$(losetup --direct-io=on -f --show "$BACKING")
K_FILE=${LOOPDEV#/dev/}
[[ $(cat "/sys/block/$K_FILE/loop/dio") == 1 ]] || { echo "$LOOPDEV did not enable direct I/O" >&2; exit 1; }

# class:queues:side -> disk name, and a label for tables and charts.
declare -A DEV=(
    [null:1:userblk]=$UB_NULL1 [null:2:userblk]=$UB_NULL2
    [null:1:rublk]=$RB_NULL1 [null:2:rublk]=$RB_NULL2
    [null:1:kernel]=$K_NULL1 [null:2:kernel]=$K_NULL2
    [file:1:userblk]=$UB_FILE1 [file:2:userblk]=$UB_FILE2
    [file:1:rublk]=$RB_FILE1 [file:2:rublk]=$RB_FILE2
    [file:1:kernel]=$K_FILE [file:2:kernel]=$K_FILE
)
declare -A LABEL=(
    [null:userblk]="userblk null${NULL_ARGS[*]:+ ${NULL_ARGS[*]}}" [null:rublk]="rublk null${RUBLK_ARGS[*]:+ ${RUBLK_ARGS[*]}}" [null:kernel]="null_blk"
    [file:userblk]="userblk file${FILE_ARGS[*]:+ ${FILE_ARGS[*]}}" [file:rublk]="rublk loop${RUBLK_ARGS[*]:+ ${RUBLK_ARGS[*]}}" [file:kernel]="loop dio"
)
SIDES=(userblk rublk kernel)
DISKS=()
for key in null:1:userblk null:1:rublk null:1:kernel null:2:userblk null:2:rublk null:2:kernel \
    file:1:userblk file:1:rublk file:1:kernel file:2:userblk file:2:rublk; do
    DISKS+=("${DEV[$key]}")
done
{
    printf 'class\tqueues\tside\tdisk\tlabel\n'
    for key in "${!DEV[@]}"; do
        IFS=: read -r c q s <<<"$key"
        printf '%s\t%s\t%s\t%s\t%s\n' "$c" "$q" "$s" "${DEV[$key]}" "${LABEL[$c:$s]}"
    done | sort
} >"$OUT/devices.tsv"

# ---- fairness ----------------------------------------------------------------

# Same elevator, request count, block size and largest request on every
# device. Left alone, the one-queue ublk devices get mq-deadline (and 256
# requests), the others none; loop allows 1280 KiB requests and null_blk 127
# KiB by default, the ublk devices 512 KiB (their io buffer size). An I/O
# scheduler or a different split of large requests would measure itself, not
# the driver.
for d in "${DISKS[@]}"; do
    echo none >"/sys/block/$d/queue/scheduler"
    if [[ $(cat "/sys/block/$d/queue/max_sectors_kb") != 512 ]]; then
        echo 512 >"/sys/block/$d/queue/max_sectors_kb"
    fi
done
record "echo none >/sys/block/DISK/queue/scheduler (every device); echo 512 >/sys/block/$K_FILE/queue/max_sectors_kb"

describe_dev() {
    local q=/sys/block/$1/queue
    printf '%-10s hw_queues=%s nr_requests=%s scheduler=%s logical_block=%s physical_block=%s max_sectors_kb=%s write_cache="%s" size=%s\n' \
        "$1" "$(find "/sys/block/$1/mq" -mindepth 1 -maxdepth 1 | wc -l)" "$(cat "$q"/nr_requests)" \
        "$(sed 's/.*\[\(.*\)\].*/\1/' "$q"/scheduler)" "$(cat "$q"/logical_block_size)" \
        "$(cat "$q"/physical_block_size)" "$(cat "$q"/max_sectors_kb)" "$(cat "$q"/write_cache)" \
        "$(( $(cat "/sys/block/$1/size") * 512 ))"
}
# The settings that must match, or the run is refused.
check_fair() {
    local attr want=$2 d bad=0 got
    attr=$1
    for d in "${DISKS[@]}"; do
        got=$(cat "/sys/block/$d/queue/$attr")
        if [[ $attr == scheduler && $got =~ \[([^]]*)\] ]]; then got=${BASH_REMATCH[1]}; fi
        [[ $got == "$want" ]] || { echo "unfair setup: $d $attr=$got, want $want" >&2; bad=1; }
    done
    return "$bad"
}
FAIR=0
check_fair scheduler none || FAIR=1
check_fair nr_requests 128 || FAIR=1
check_fair logical_block_size 512 || FAIR=1
check_fair max_sectors_kb 512 || FAIR=1

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "kernel: $(uname -r); cpus: $(nproc); mem: $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
    echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
    echo "clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
    echo "userblk: $("$USERBLK" --version), sha256 $(sha256sum <"$USERBLK" | cut -c1-16), built $(date -u -r "$USERBLK" '+%Y-%m-%d %H:%M:%S UTC')"
    echo "rublk: $("$RUBLK" --version), sha256 $(sha256sum <"$RUBLK" | cut -c1-16)"
    echo "$(fio --version); runtime ${RUNTIME}s x $REPEAT repeats per device and workload, order rotated"
    echo "backing file: ${BACKING_MIB} MiB of written pages in tmpfs ($BACKING), shared by every file device"
    for d in "${NULLB_DIRS[@]}"; do
        printf 'null_blk %s:' "${d##*/}"
        for kv in "${NULLB_ATTRS[@]}"; do printf ' %s=%s' "${kv%%=*}" "$(cat "$d/${kv%%=*}")"; done
        echo
    done
    echo "devices (class:queues:side disk):"
    for key in null:1:userblk null:1:rublk null:1:kernel null:2:userblk null:2:rublk null:2:kernel \
        file:1:userblk file:1:rublk file:1:kernel file:2:userblk file:2:rublk file:2:kernel; do
        printf '  %-15s %s\n' "$key" "$(describe_dev "${DEV[$key]}")"
    done
    echo "fairness: scheduler none, nr_requests 128 per hw queue, logical block 512, max request 512 KiB on every device: $( ((FAIR == 0)) && echo checked || echo 'NOT MET (see stderr)')"
    echo "fairness, what differs: userblk's null target zero-fills each read buffer, rublk's null and null_blk (memory_backed=0) do not touch data;"
    echo "  loop has one hw queue, so its 2-job runs use the 1-queue device; write_cache differs (userblk null: write through; rublk null: write back) but no job flushes;"
    echo "  physical block 4096 on ublk devices, 512 on null_blk and loop (no job issues I/O below 4 KiB)."
} >"$OUT/env.txt"
cat "$OUT/env.txt"
phase "devices ready"
(( FAIR == 0 )) || { echo "devices are not set up alike; refusing to measure" >&2; exit 1; }

# ---- workloads ---------------------------------------------------------------

# key|class|title|jobs (= queues of the device)|fio arguments
ALL_WORKLOADS=(
    "null-randread-4k-qd1|null|4k randread QD1|1|--rw=randread --bs=4k --iodepth=1"
    "null-randread-4k-qd64|null|4k randread QD64|1|--rw=randread --bs=4k --iodepth=64"
    "null-randwrite-4k-qd1|null|4k randwrite QD1|1|--rw=randwrite --bs=4k --iodepth=1"
    "null-randwrite-4k-qd64|null|4k randwrite QD64|1|--rw=randwrite --bs=4k --iodepth=64"
    "null-randread-4k-qd64-2j|null|4k randread QD64 2 jobs|2|--rw=randread --bs=4k --iodepth=64"
    "null-randwrite-4k-qd64-2j|null|4k randwrite QD64 2 jobs|2|--rw=randwrite --bs=4k --iodepth=64"
    "null-read-128k-qd8|null|128k seqread QD8|1|--rw=read --bs=128k --iodepth=8"
    "null-read-1m-qd8|null|1M seqread QD8|1|--rw=read --bs=1M --iodepth=8"
    "file-randread-4k-qd1|file|4k randread QD1|1|--rw=randread --bs=4k --iodepth=1"
    "file-randread-4k-qd64|file|4k randread QD64|1|--rw=randread --bs=4k --iodepth=64"
    "file-randwrite-4k-qd1|file|4k randwrite QD1|1|--rw=randwrite --bs=4k --iodepth=1"
    "file-randwrite-4k-qd64|file|4k randwrite QD64|1|--rw=randwrite --bs=4k --iodepth=64"
    "file-randread-4k-qd64-2j|file|4k randread QD64 2 jobs|2|--rw=randread --bs=4k --iodepth=64"
    "file-randwrite-4k-qd64-2j|file|4k randwrite QD64 2 jobs|2|--rw=randwrite --bs=4k --iodepth=64"
    "file-read-128k-qd8|file|128k seqread QD8|1|--rw=read --bs=128k --iodepth=8"
    "file-read-1m-qd8|file|1M seqread QD8|1|--rw=read --bs=1M --iodepth=8"
    "file-write-128k-qd8|file|128k seqwrite QD8|1|--rw=write --bs=128k --iodepth=8"
    "file-write-1m-qd8|file|1M seqwrite QD8|1|--rw=write --bs=1M --iodepth=8"
)
WORKLOADS=()
for w in "${ALL_WORKLOADS[@]}"; do
    if [[ -z $ONLY ]] || grep -Eq -- "$ONLY" <<<"${w%%|*}"; then WORKLOADS+=("$w"); fi
done
(( ${#WORKLOADS[@]} )) || { echo "no workload key matches '$ONLY'" >&2; exit 2; }

# The same job for every side of a workload; only --filename differs.
# --norandommap: no block-coverage bitmap (250 GiB of it on the null
# devices); --group_reporting: one result for the 2-job runs, with merged
# latency percentiles.
FIO_COMMON=(--ioengine=io_uring --direct=1 --time_based --runtime="$RUNTIME" --norandommap
    --randrepeat=0 --group_reporting --eta=never --output-format=json)
{
    printf 'key\tclass\ttitle\tjobs\tfio\n'
    for w in "${WORKLOADS[@]}"; do
        IFS='|' read -r key class title jobs args <<<"$w"
        printf '%s\t%s\t%s\t%s\t%s\n' "$key" "$class" "$title" "$jobs" "$args --numjobs=$jobs ${FIO_COMMON[*]}"
    done
} >"$OUT/workloads.tsv"

# Guest CPU time per run. fio saturates its vCPU either way, and a ublk
# server's queue thread runs on the other one, so IOPS alone hide where the
# work went. fio runs this before and after each job (exec_prerun and
# exec_postrun run outside the job's timed I/O, and a 2-job run calls it
# once per clone): it appends the "cpu" line of /proc/stat, all CPUs, to
# FILE. A plain sh script: an exec costs a lot under TCG.
STAT=$WORK/stat
cat >"$STAT" <<'SH'
#!/bin/sh
# stat TAG FILE
read -r line </proc/stat
echo "$1 $line" >>"$2"
SH
chmod +x "$STAT"
CLK_TCK=$(getconf CLK_TCK) NCPU=$(nproc)

# `fio_cmd KEY JOBS ARGS REP SIDE...`: into CMD, one fio run with one job per
# SIDE, in that order, each behind a stonewall (one after the other, each
# its own result). One fio start per workload instead of one per device:
# fio links 60 libraries, and under TCG a start costs a second or more.
fio_cmd() {
    local key=$1 jobs=$2 args=$3 rep=$4 side cpu class=${1%%-*}; shift 4
    # shellcheck disable=SC2206  # args holds several words on purpose
    CMD=(fio "${FIO_COMMON[@]}" $args --numjobs="$jobs" --output="$OUT/raw/$key.$rep.json")
    for side in "$@"; do
        cpu=$OUT/raw/$key.$side.$rep.cpu
        CMD+=(--name="$key-$side" --filename="/dev/${DEV[$class:$jobs:$side]}" --stonewall
            --exec_prerun="$STAT pre $cpu" --exec_postrun="$STAT post $cpu")
    done
}
record ""
record "# fio, one run per workload and repeat, the devices one after the other (the order rotates:"
record "# order.tsv); FILE: raw/<workload>.<repeat>.json; exec_prerun/postrun log /proc/stat's cpu line"
for w in "${WORKLOADS[@]}"; do
    IFS='|' read -r key class title jobs args <<<"$w"
    fio_cmd "$key" "$jobs" "$args" REP "${SIDES[@]}"
    record "${CMD[*]}"
done

# ---- warm-up -----------------------------------------------------------------

# The first fio on a device pays for things no later run does: fio's own
# first start over 9p (~6 s under TCG), TCG translating the daemons' code
# paths, request buffers touched for the first time. One short untimed pass
# (1 s of 4k random reads, then 1 s of 1 MiB reads) on every device takes
# that out.
WARM=(fio --ioengine=io_uring --direct=1 --time_based --runtime=1 --norandommap --eta=never
    --output="$OUT/warm-up.txt")
for d in "${DISKS[@]}"; do
    WARM+=(--name="warm-4k-$d" --filename="/dev/$d" --stonewall --rw=randread --bs=4k --iodepth=64
        --name="warm-1m-$d" --filename="/dev/$d" --stonewall --rw=read --bs=1M --iodepth=8)
done
record ""
record "# warm-up, not measured"
record "${WARM[*]}"
timeout -k 10 $(( 4 * ${#DISKS[@]} + 120 )) "${WARM[@]}" || { echo "warm-up fio failed (see $OUT/warm-up.txt)" >&2; exit 1; }
phase "warm-up done on ${#DISKS[@]} devices"

# ---- runs --------------------------------------------------------------------

# fio's exec_prerun writes its output next to fio's cwd: a scratch one.
mkdir -p "$WORK/cwd"
cd "$WORK/cwd"
FAILED=0 N=0
TOTAL=$(( ${#WORKLOADS[@]} * REPEAT ))
printf 'seq\tkey\trepeat\tposition\tside\tstart_utc\n' >"$OUT/order.tsv"
run_workload() { # run_workload KEY JOBS ARGS REP SIDE...
    local key=$1 jobs=$2 args=$3 rep=$4 side pos=0 rc=0 text name sum line=''
    shift 4
    N=$(( N + 1 ))
    for side in "$@"; do
        pos=$(( pos + 1 ))
        printf 'hz %s %s\n' "$CLK_TCK" "$NCPU" >"$OUT/raw/$key.$side.$rep.cpu"
        TZ=UTC printf '%d\t%s\t%d\t%d\t%s\t%(%H:%M:%S)T\n' "$N" "$key" "$rep" "$pos" "$side" -1 >>"$OUT/order.tsv"
    done
    fio_cmd "$key" "$jobs" "$args" "$rep" "$@"
    # A wedged device must not eat the VM's whole timeout.
    timeout -k 10 $(( $# * (RUNTIME + 30) + 60 )) "${CMD[@]}" || rc=$?
    if (( rc != 0 )); then
        echo "FAIL fio $key rep $rep: exit $rc" >&2
        grep -a -E '^fio:|"error"' "$OUT/raw/$key.$rep.json" >&2 2>/dev/null || true
        FAILED=1
    fi
    # Progress only (the host summarises): after each job's name, fio's
    # next two "iops" keys are its read and its write side.
    text=$(<"$OUT/raw/$key.$rep.json") || text=''
    while [[ $text =~ \"jobname\"\ :\ \"([^\"]*)\"(.*) ]]; do
        name=${BASH_REMATCH[1]} text=${BASH_REMATCH[2]} sum=0
        for _ in 1 2; do
            if [[ $text =~ \"iops\"\ :\ ([0-9]+)(\.[0-9]*)?(.*) ]]; then
                sum=$(( sum + BASH_REMATCH[1] )) text=${BASH_REMATCH[3]}
            fi
        done
        line+="  ${name#"$key"-} $sum"
    done
    phase "[$N/$TOTAL] $key rep $rep IOPS:$line"
}

for (( rep = 1; rep <= REPEAT; rep++ )); do
    for (( i = 0; i < ${#WORKLOADS[@]}; i++ )); do
        IFS='|' read -r key class title jobs args <<<"${WORKLOADS[$i]}"
        # Rotate which side goes first, by repeat and by workload: over 3
        # repeats each side runs first, second and third once on every
        # workload, so drift (host load, page cache, TCG's code cache)
        # falls on all of them alike.
        order=()
        for (( s = 0; s < ${#SIDES[@]}; s++ )); do
            order+=("${SIDES[$(( (s + rep - 1 + i) % ${#SIDES[@]} ))]}")
        done
        run_workload "$key" "$jobs" "$args" "$rep" "${order[@]}"
    done
done
cd /

# Daemon logs: a panic or I/O error there would explain an odd figure.
for f in "$USERBLK_STATE_DIR"/*.log; do
    if [[ -s $f ]]; then cp "$f" "$OUT/userblk-${f##*/}"; fi
done
"$RUBLK" list >"$OUT/rublk-list.txt" 2>&1 || true
dmesg >"$OUT/dmesg.txt"
(( FAILED == 0 )) || { echo "some fio runs failed (see above)" >&2; exit 1; }
phase "all $N fio runs done"
