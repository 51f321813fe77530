#!/usr/bin/env bash
# userblk against rublk and the kernel's null_blk and loop, in one VM boot:
# the same fio jobs (4k random read/write at QD 1 and 64, 2 jobs on 2 queues,
# 128 KiB and 1 MiB sequential) on null devices and on devices over one
# tmpfs file. Prints a table per workload (IOPS, MiB/s, p50/p99, CPU per I/O,
# userblk/rublk and userblk/kernel), draws a PNG, keeps the raw fio JSON.
# Run on the host (needs vm/setup.sh done once). See bench/README.md.
#
#   bench/perf.sh [--quick] [--runtime SECS] [--repeat N] [--results DIR] [--only REGEX]
#                 [--file-args ARGS] [--publish]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat >&2 <<'EOF'
usage: bench/perf.sh [--quick] [--runtime SECS (6)] [--repeat N (3)] [--results DIR (/tmp/userblk-bench)]
                     [--only REGEX] [--file-args ARGS] [--publish]
  --quick     smoke run: --runtime 3 --repeat 1 (~5 min) unless given too
  --only      run only the workloads whose key matches REGEX (grep -E), e.g. 'null-.*qd64'
  --file-args more arguments for userblk's file devices, e.g. '--zero-copy' (on a 6.16+
              kernel: USERBLK_VM_CACHE of a vm/setup.sh run with USERBLK_VM_KSUITE)
  --null-args more arguments for userblk's null devices, e.g. '--zero-copy'
  --rublk-args more arguments for every rublk device, e.g. '-z'
  --publish   copy summary.txt, summary.csv, runs.csv and perf.png into docs/perf/
              (docs/perf/linux-X.Y/ for a kernel other than the default 6.12)
              (refused with --quick, --only or fewer than 3 repeats)
environment: RUBLK (rublk binary, default /opt/rublk/bin/rublk, installed with cargo if
             missing), RUBLK_VERSION (what to install, default 0.2.15)
EOF
    exit 2
}

RUNTIME='' REPEAT='' RESULTS=/tmp/userblk-bench QUICK=0 PUBLISH=0 ONLY='' FILE_ARGS='' NULL_ARGS='' RUBLK_ARGS=''
ARGS=("$@")
while (( $# )); do
    case $1 in
        --quick) QUICK=1; shift ;;
        --runtime) (( $# >= 2 )) || usage; RUNTIME=$2; shift 2 ;;
        --repeat) (( $# >= 2 )) || usage; REPEAT=$2; shift 2 ;;
        --results) (( $# >= 2 )) || usage; RESULTS=$2; shift 2 ;;
        --only) (( $# >= 2 )) || usage; ONLY=$2; shift 2 ;;
        --file-args) (( $# >= 2 )) || usage; FILE_ARGS=$2; shift 2 ;;
        --null-args) (( $# >= 2 )) || usage; NULL_ARGS=$2; shift 2 ;;
        --rublk-args) (( $# >= 2 )) || usage; RUBLK_ARGS=$2; shift 2 ;;
        --publish) PUBLISH=1; shift ;;
        -h|--help) usage ;;
        *) echo "bench: unknown argument $1" >&2; usage ;;
    esac
done
if (( QUICK )); then : "${RUNTIME:=3}" "${REPEAT:=1}"; else : "${RUNTIME:=6}" "${REPEAT:=3}"; fi
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "--runtime wants seconds, not '$RUNTIME'"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "--repeat wants a positive integer, not '$REPEAT'"
[[ -n $RESULTS ]] || die "--results wants a directory"
if [[ -n $ONLY ]]; then
    rc=0; grep -Eq -- "$ONLY" <<<'' 2>/dev/null || rc=$?
    (( rc <= 1 )) || die "--only '$ONLY' is not a valid extended regex"
fi
if (( PUBLISH )); then
    (( QUICK == 0 )) || die "--publish wants a full run, not --quick"
    [[ -z $ONLY ]] || die "--publish wants every workload, not --only"
    [[ -z $FILE_ARGS ]] || die "--publish wants the default devices, not --file-args"
    [[ -z $NULL_ARGS$RUBLK_ARGS ]] || die "--publish wants the default devices, not --null-args or --rublk-args"
    (( REPEAT >= 3 )) || die "--publish wants at least 3 repeats"
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD

# ---- tools -------------------------------------------------------------------

for tool in fio python3 qemu-system-x86_64; do
    command -v "$tool" >/dev/null || die "$tool is missing: run vm/setup.sh (as root) first"
done
# The chart needs Debian's python3-matplotlib, which belongs to /usr/bin/python3
# (a python3 earlier in PATH, e.g. pyenv's, would not see it).
PY=python3
[[ -x /usr/bin/python3 ]] && PY=/usr/bin/python3
apt_install() { # apt_install PACKAGE... (root only)
    (( EUID == 0 )) || die "$* missing and not root: apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 "$@" >&2 \
        || die "apt-get install $* failed"
}
if ! "$PY" -c 'import matplotlib' 2>/dev/null; then
    echo "bench: python3-matplotlib is missing (for the chart); installing it with apt-get" >&2
    apt_install python3-matplotlib
    "$PY" -c 'import matplotlib' || die "matplotlib still not importable after installing python3-matplotlib"
fi

bench_rublk

bench_build
# Only a missing binary is built; a stale one is measured as is, but said so.
bench_stale target/release/userblk
commit=$(bench_commit)

# ---- run ---------------------------------------------------------------------

# The VM needs both host cores (fio on one vCPU, a ublk server's queue
# thread on the other), so anything else running skews the figures, against
# the ublk servers more than the kernel drivers. Host CPU time minus our own
# children's says how much others took during the run.
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
# (pgrep -x cannot match it: process names are cut to 15 characters.)
other_vms() { pgrep -f '^(/[^ ]*/)?qemu-system-x86_64 ' | paste -sd ' ' || true; }
vms0=$(other_vms)
[[ -z $vms0 ]] || echo "bench: warning: another qemu-system-x86_64 is running (pid $vms0); figures will be noisy" >&2

stamp=$(date +%Y%m%d-%H%M%S)
mkdir -p "$RESULTS"
RESULTS=$(realpath "$RESULTS")
# fio hands the guest's per-job CPU probe (exec_prerun) to sh with this path in it.
[[ $RESULTS =~ ^[A-Za-z0-9_./+-]+$ ]] || die "--results $RESULTS: use a path of letters, digits and _ . / + - only"
OUT=$RESULTS/perf-$stamp
mkdir "$OUT"
# 18 workloads per repeat, one fio run each with a job per device: 3 x
# RUNTIME plus ~4 s (fio start-up, the jobs' set-up); plus boot, a dd of the
# backing file, device set-up and warm-up, together about 2.5 minutes.
RUNS=$(( 18 * REPEAT ))
echo "bench: up to $RUNS fio runs of 3 x ${RUNTIME}s; expect about $(( (RUNS * (3 * RUNTIME + 4) + 150 + 59) / 60 )) minutes; results in $OUT" >&2
TIMEOUT=$(( RUNS * (3 * (RUNTIME + 30) + 60) + 900 ))

start=$SECONDS busy0=$(cpu_busy) ours0=$(children_cpu) load0=$(loadavg)
rc=0
USERBLK_BENCH_FILE_ARGS=$FILE_ARGS USERBLK_BENCH_NULL_ARGS=$NULL_ARGS USERBLK_BENCH_RUBLK_ARGS=$RUBLK_ARGS \
USERBLK_VM_PASSENV="${USERBLK_VM_PASSENV:-CI RUST_BACKTRACE RUST_LOG} USERBLK_BENCH_FILE_ARGS USERBLK_BENCH_NULL_ARGS USERBLK_BENCH_RUBLK_ARGS" \
USERBLK_VM_LOG=$OUT/console.log vm/run.sh --timeout "$TIMEOUT" --out "$OUT" -- \
    bench/guest/perf.sh "$OUT" "$RUNTIME" "$REPEAT" "$RUBLK" "$ONLY" || rc=$?
wall=$(( SECONDS - start ))
vms1=$(other_vms)
# Percent of one core used by others, averaged over the run.
others=$(others_pct "$busy0" "$ours0" "$start")
if (( others > 10 )); then
    echo "bench: warning: other host processes used ${others}% of a core during the run; figures are skewed" >&2
fi

{
    echo "userblk vs rublk vs kernel, $(date '+%Y-%m-%d %H:%M') on $(hostname) ($(nproc) host cores, qemu TCG, 2 vCPUs)"
    echo "commit at start: $commit${stale:+; binary older than $stale}; rublk $("$RUBLK" --version | awk '{print $2}')"
    echo "wall time ${wall}s (runtime ${RUNTIME}s x repeat $REPEAT); guest status $rc;" \
        "host CPU used by others meanwhile: ${others}% of one core; load average $load0 at start, $(loadavg) at end;" \
        "other qemu VMs: ${vms0:-none} at start, ${vms1:-none} at end"
    printf 'command: bench/perf.sh'; (( ${#ARGS[@]} == 0 )) || printf ' %q' "${ARGS[@]}"; echo
    echo "raw fio JSON, env, dmesg, console log: $OUT/"
} >"$OUT/host.txt"

if ! ls "$OUT"/raw/*.json >/dev/null 2>&1; then
    echo "bench: no fio results from the guest (status $rc); console log: $OUT/console.log" >&2
    exit $(( rc ? rc : 1 ))
fi
src=0
"$PY" bench/guest/perf_summary.py "$OUT" || src=$?
(( src == 0 )) || echo "bench: some runs could not be read (see 'runs left out' above)" >&2
"$PY" bench/guest/perf_chart.py "$OUT" "$OUT/perf.png" >&2 || { echo "bench: the chart failed" >&2; src=1; }
(( rc )) || rc=$src

if (( PUBLISH )); then
    if (( rc )); then
        echo "bench: not publishing: the run had failures (status $rc)" >&2
    else
        # The default kernel's figures are docs/perf/'s own; another
        # kernel's (USERBLK_VM_CACHE of a newer one) go to docs/perf/linux-X.Y/.
        kver=$(cat "${USERBLK_VM_CACHE:-/var/cache/userblk-vm}/kver" 2>/dev/null || echo 6.12)
        pub=docs/perf
        [[ $kver == 6.12* ]] || pub=docs/perf/linux-$(cut -d. -f1,2 <<<"$kver")
        mkdir -p "$REPO/$pub"
        cp "$OUT/summary.txt" "$OUT/summary.csv" "$OUT/runs.csv" "$OUT/perf.png" "$REPO/$pub/"
        echo "bench: published summary.txt, summary.csv, runs.csv, perf.png to $pub/" >&2
    fi
fi
echo "bench: saved $OUT/summary.txt, summary.csv, runs.csv, perf.png" >&2
exit "$rc"
