#!/usr/bin/env bash
# userblk's qcow2 target against qemu-nbd, same fio jobs, identical qcow2
# images in tmpfs, in two parts (see bench/README.md):
#   vm    in one VM boot: `userblk add qcow2` (a ublk device) against
#         `qemu-nbd -c /dev/nbd0` (qemu-nbd + the kernel's nbd client),
#         fio io_uring, direct I/O, on the two block devices;
#   host  no VM: userblk's NBD export of the image (`--listen unix:`)
#         against `qemu-nbd -k SOCK`, fio's nbd engine (libnbd).
# Jobs: 4k random read and write at QD 32, 1 MiB sequential read and write
# at QD 8, on a fully preallocated image and on a fresh empty one; every
# job REPEAT times; median, min-max and userblk/qemu-nbd per job.
#
#   bench/qcow2-vs-qemu-nbd.sh [--runtime SECS (10)] [--repeat N (3)] [--size MIB (1024)]
#       [--part vm|host|both (both)] [--results DIR (/tmp/userblk-bench)]
#   QEMU_NBD_OPTS='--cache=writeback --aio=threads' (qemu-nbd's defaults, spelled out)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    echo "usage: bench/qcow2-vs-qemu-nbd.sh [--runtime SECS (10)] [--repeat N (3)] [--size MIB (1024)]" \
        "[--part vm|host|both] [--results DIR (/tmp/userblk-bench)]" >&2
    exit 2
}
RUNTIME=10 REPEAT=3 SIZE=1024 PART=both RESULTS=/tmp/userblk-bench QD4K=32 QD1M=8
QEMU_NBD_OPTS=${QEMU_NBD_OPTS:---cache=writeback --aio=threads}
while (( $# )); do
    case $1 in
        --runtime) (( $# >= 2 )) || usage; RUNTIME=$2; shift 2 ;;
        --repeat) (( $# >= 2 )) || usage; REPEAT=$2; shift 2 ;;
        --size) (( $# >= 2 )) || usage; SIZE=$2; shift 2 ;;
        --part) (( $# >= 2 )) || usage; PART=$2; shift 2 ;;
        --results) (( $# >= 2 )) || usage; RESULTS=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "bench: unknown argument $1" >&2; usage ;;
    esac
done
for v in RUNTIME REPEAT SIZE; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "bench: --${v,,} wants a positive integer, not '${!v}'" >&2; exit 2; }
done
(( SIZE >= 64 )) || { echo "bench: --size is in MiB, at least 64" >&2; exit 2; }
[[ $PART == vm || $PART == host || $PART == both ]] || usage

cd "$(dirname "${BASH_SOURCE[0]}")/.."
for tool in fio qemu-img qemu-nbd python3; do
    command -v $tool >/dev/null || { echo "bench: $tool not found (apt-get install fio qemu-utils)" >&2; exit 2; }
done
bench_build
bench_stale target/release/userblk
commit=$(bench_commit)

# Host CPU others used while we ran (others_pct, lib.sh: our children's time taken out; the
# userblk daemons of the host part are not our children, see the report).

stamp=$(date +%Y%m%d-%H%M%S)
mkdir -p "$RESULTS"
RES=$(realpath "$RESULTS")/qcow2-$stamp
mkdir -p "$RES"
REPORT=$RES/report.txt
rc=0 lines=()
start_all=$SECONDS

if [[ $PART != host ]]; then
    pgrep -f '^[^ ]*qemu-system-x86_64 ' >/dev/null && echo "bench: warning: another qemu-system-x86_64 is running; figures will be noisy" >&2
    # Images: up to 4 x SIZE in the guest's tmpfs (two kept, two fresh).
    mem=$(( (4 * SIZE + 2048 + 1023) / 1024 ))G
    # 8 fio runs per repeat, two jobs each, plus start-ups, images, boot.
    timeout=$(( 8 * REPEAT * (2 * RUNTIME + 40) + 600 ))
    echo "bench: VM part (mem $mem, timeout ${timeout}s), results in $RES/vm" >&2
    mkdir -p "$RES/vm"
    s0=$SECONDS b0=$(cpu_busy) c0=$(children_cpu) vrc=0
    # The console streams to stdout as it comes (and to console.log).
    USERBLK_VM_LOG=$RES/vm/console.log vm/run.sh --mem "$mem" --timeout "$timeout" --out "$RES/vm" -- \
        bench/guest/qcow2-vs-qemu-nbd.sh ublk "$RES/vm" "$RUNTIME" "$REPEAT" "$SIZE" "$QD4K" "$QD1M" "$QEMU_NBD_OPTS" \
        || vrc=$?
    others=$(others_pct "$b0" "$c0" "$s0")
    lines+=("vm part: $(( SECONDS - s0 ))s, guest status $vrc, host CPU used by others meanwhile: ${others}% of one core")
    (( others > 10 )) && echo "bench: warning: other host processes used ${others}% of a core during the VM part; figures are skewed" >&2
    if [[ ! -s $RES/vm/summary.txt ]]; then
        echo "bench: no summary from the guest (status $vrc); console: $RES/vm/console.log" >&2
        rc=1
    fi
    (( vrc == 0 )) || rc=1
fi

if [[ $PART != vm ]]; then
    echo "bench: host part, results in $RES/host" >&2
    s0=$SECONDS b0=$(cpu_busy) c0=$(children_cpu) hrc=0
    bash bench/guest/qcow2-vs-qemu-nbd.sh nbd "$RES/host" "$RUNTIME" "$REPEAT" "$SIZE" "$QD4K" "$QD1M" "$QEMU_NBD_OPTS" \
        2> >(tee "$RES/host-stderr.txt" >&2) >/dev/null || hrc=$?
    others=$(others_pct "$b0" "$c0" "$s0")
    lines+=("host part: $(( SECONDS - s0 ))s, status $hrc, host CPU used by others (userblk's daemons included) meanwhile: ${others}% of one core; loadavg $(cut -d' ' -f1-3 /proc/loadavg)")
    [[ -s $RES/host/summary.txt ]] || { echo "bench: no summary from the host part (status $hrc)" >&2; rc=1; }
    (( hrc == 0 )) || rc=1
fi

{
    echo "userblk qcow2 vs qemu-nbd, $(date '+%Y-%m-%d %H:%M') on $(hostname) ($(nproc) host cores, $(uname -r))"
    echo "commit $commit${stale:+ (binary older than $stale)}; RUNTIME=${RUNTIME}s REPEAT=$REPEAT SIZE=${SIZE}MiB;" \
        "QEMU_NBD_OPTS='$QEMU_NBD_OPTS'; wall $(( SECONDS - start_all ))s"
    for l in "${lines[@]}"; do echo "$l"; done
    echo "raw fio JSON, commands, env, logs: $RES/"
    for p in vm host; do
        [[ -s $RES/$p/summary.txt ]] || continue
        echo
        [[ $p == vm ]] && echo "== VM (qemu TCG, 2 vCPUs, Debian 6.12): ublk vs kernel nbd + qemu-nbd ==" \
            || echo "== host (no VM): NBD export vs qemu-nbd, fio nbd engine =="
        cat "$RES/$p/summary.txt"
    done
} >"$REPORT"
echo
cat "$REPORT"
echo "bench: saved $REPORT" >&2
exit "$rc"
