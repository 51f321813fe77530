#!/usr/bin/env bash
# An RBD image three ways, in one VM boot on one Ceph cluster: userblk's
# rbd target over ublk, Ceph's rbd-nbd, and the kernel's rbd driver (krbd).
# fio 4k random read and write at QD32, 1 MiB sequential read and write at
# QD8, each RUNTIME seconds, REPEAT times per device in rotated order; the
# report gives medians (min-max) and the ratios userblk/rbd-nbd and
# userblk/krbd. Run on the host (needs vm/setup.sh done once, and ceph
# installed: tests/ceph/cluster.sh install). See bench/README.md.
#
#   bench/rbd.sh [--quick] [--size MIB (512)] [--runtime SECS (20)] [--repeat N (3)]
#       [--mem SIZE (4G)] [--results DIR (/tmp/userblk-bench)]
# USERBLK=path (default target/release/userblk, built if missing);
# USERBLK_VM_CACHE picks the VM kernel as for vm/run.sh. RBD_BENCH_UB_ARGS: more
# `userblk add` options (e.g. "-q 2 --io-buf-size 4M"); CEPH_ARGS reaches every
# Ceph client in the guest (librbd of userblk and rbd-nbd, e.g. "--rbd_cache=false").
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    echo "usage: bench/rbd.sh [--quick] [--size MIB (512)] [--runtime SECS (20)] [--repeat N (3)]" \
        "[--mem SIZE (4G)] [--results DIR (/tmp/userblk-bench)]" >&2
    exit 2
}

SIZE=512 RUNTIME=20 REPEAT=3 MEM=4G RESULTS=/tmp/userblk-bench
while (( $# )); do
    case $1 in
        --quick) SIZE=64 RUNTIME=2 REPEAT=1; shift ;;
        --size) (( $# >= 2 )) || usage; SIZE=$2; shift 2 ;;
        --runtime) (( $# >= 2 )) || usage; RUNTIME=$2; shift 2 ;;
        --repeat) (( $# >= 2 )) || usage; REPEAT=$2; shift 2 ;;
        --mem) (( $# >= 2 )) || usage; MEM=$2; shift 2 ;;
        --results) (( $# >= 2 )) || usage; RESULTS=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "bench: unknown argument $1" >&2; usage ;;
    esac
done
for v in SIZE RUNTIME REPEAT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "${v,,} wants a positive integer, not '${!v}'"
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v rbd-nbd >/dev/null && command -v ceph-osd >/dev/null \
    || die "ceph is not installed (tests/ceph/cluster.sh install; rbd-nbd: apt-get install rbd-nbd)"
if [[ -z ${USERBLK:-} ]]; then
    bench_build
    USERBLK=$PWD/target/release/userblk
fi
[[ -x $USERBLK ]] || die "no userblk binary at $USERBLK"
bench_stale "$USERBLK"
commit=$(bench_commit)
if pgrep -f "^[^ ]*qemu-system-x86_64 " >/dev/null; then
    echo "bench: warning: another qemu-system-x86_64 is running; figures will be noisy" >&2
fi

stamp=$(date +%Y%m%d-%H%M%S)
mkdir -p "$RESULTS"
RESULTS=$(realpath "$RESULTS")
OUT=$RESULTS/rbd-$stamp
REPORT=$RESULTS/rbd-$stamp.txt
# A private copy of the binary: a rebuild on the host mid-run must not
# change it under the guest (9p, cache=loose).
mkdir -p "$OUT"
cp -p "$USERBLK" "$OUT/userblk"
# 4 jobs x 3 devices per repeat, each RUNTIME plus fio's start and a map;
# plus boot, the cluster's start (minutes under TCG) and the image's fill.
TIMEOUT=$(( 12 * REPEAT * (RUNTIME + 40) + 900 + SIZE ))

start=$SECONDS busy0=$(cpu_busy) ours0=$(children_cpu)
rc=0
USERBLK=$OUT/userblk USERBLK_VM_PASSENV="USERBLK CEPH_TIMEOUT CEPH_ARGS RBD_BENCH_UB_ARGS" USERBLK_VM_LOG=$OUT/console.log \
    vm/run.sh --mem "$MEM" --timeout "$TIMEOUT" --out "$OUT" -- \
    bench/guest/rbd.sh "$OUT" "$RUNTIME" "$REPEAT" "$SIZE" || rc=$?
wall=$(( SECONDS - start ))
others=$(others_pct "$busy0" "$ours0" "$start")
(( others <= 10 )) || echo "bench: warning: other host processes used ${others}% of a core during the run; figures are skewed" >&2
rm -f "$OUT/userblk"

if [[ ! -s $OUT/summary.txt ]]; then
    echo "bench: no summary from the guest (status $rc); console log: $OUT/console.log" >&2
    exit $(( rc ? rc : 1 ))
fi
{
    echo "rbd: userblk vs rbd-nbd vs krbd, $(date '+%Y-%m-%d %H:%M') on $(hostname) ($(nproc) host cores, qemu TCG, guest mem $MEM)"
    echo "commit at start: $commit${stale:+; binary older than $stale}"
    echo "wall time ${wall}s (size ${SIZE} MiB, runtime ${RUNTIME}s x repeat $REPEAT); guest status $rc;" \
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
