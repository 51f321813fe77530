#!/usr/bin/env bash
# userblk's NBD server frontend next to nbdkit and qemu-nbd, on the host (no
# VM), the same fio jobs (fio's nbd engine, libnbd) on each, in one run:
#   userblk   `userblk add mem --size SIZE --listen unix:SOCK` (RAM disk)
#   nbdkit    `nbdkit memory SIZE --unix SOCK` (RAM disk, default threads)
#   qemu-nbd  `qemu-nbd -f raw -k SOCK FILE`, FILE a raw image on tmpfs (/dev/shm)
# Every job is repeated REPEAT times, the servers interleaved (a different
# order on every job and repeat); the report gives the median and min-max,
# and userblk's median over each baseline's. See bench/README.md.
#
#   [RUNTIME=10] [REPEAT=3] [SIZE=1G] [OUT=/tmp/userblk-bench] [QD4K=32] [QD1M=8] \
#   [NBDKIT_THREADS=] [QEMU_NBD_OPTS='--cache=writeback --aio=threads --shared=16'] \
#       bench/nbd-vs-nbdkit-qemu-nbd.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNTIME=${RUNTIME:-10} REPEAT=${REPEAT:-3} SIZE=${SIZE:-1G} OUT=${OUT:-/tmp/userblk-bench}
QD4K=${QD4K:-32} QD1M=${QD1M:-8} NBDKIT_THREADS=${NBDKIT_THREADS:-}
QEMU_NBD_OPTS=${QEMU_NBD_OPTS:---cache=writeback --aio=threads --shared=16}
NBDKIT=${NBDKIT:-nbdkit} QEMU_NBD=${QEMU_NBD:-qemu-nbd}
for v in RUNTIME REPEAT QD4K QD1M; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v wants a positive integer, not '${!v}'"
done
[[ -z $NBDKIT_THREADS || $NBDKIT_THREADS =~ ^[1-9][0-9]*$ ]] || die "NBDKIT_THREADS wants a positive integer"
BYTES=$(numfmt --from=iec "$SIZE" 2>/dev/null) || die "SIZE wants e.g. 512M or 1G, not '$SIZE'"
(( BYTES >= 64 << 20 && BYTES % (1 << 20) == 0 )) || die "SIZE must be a whole number of MiB, at least 64M"
for tool in fio python3 nbdinfo; do command -v $tool >/dev/null || die "$tool not found"; done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (fio >= 3.20 built with libnbd)"
[[ -d /dev/shm ]] || die "no /dev/shm (qemu-nbd's image goes on tmpfs)"
# Three copies of the data live in RAM at once: userblk's and nbdkit's RAM
# disks and qemu-nbd's image on tmpfs.
need_memory $(( 3 * BYTES + (512 << 20) )) "3 x SIZE + 512M"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bench_userblk

RES=$OUT/nbd-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RES/raw" && RES=$(realpath "$RES")
WORK=$(mktemp -d /tmp/userblk-nbd-bench.XXXXXX)
SHM=$(mktemp -d /dev/shm/userblk-nbd-bench.XXXXXX)
# userblk keeps its device in a private state directory: a `userblk del -a`
# run by someone else (a test suite) cannot see, and so cannot delete, it.
export USERBLK_STATE_DIR=$WORK/userblk-state
FIO_PID='' SAMPLER='' UB_ID='' KIT_PID='' QEMU_PID=''
declare -A PID=() URI=() LABEL=() CMD=()
SERVERS=()   # the ones that came up, in order

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [[ -n $FIO_PID ]] && { kill -INT "$FIO_PID"; wait "$FIO_PID"; }
    [[ -n $SAMPLER ]] && { kill "$SAMPLER"; wait "$SAMPLER"; } 2>/dev/null
    if [[ -n $UB_ID ]] && ! "$UB" del -n "$UB_ID" >/dev/null; then
        [[ -n ${PID[userblk]:-} ]] && alive "${PID[userblk]}" && kill "${PID[userblk]}" && sleep 1
    fi
    [[ -n $KIT_PID ]] && stop_child "$KIT_PID"
    [[ -n $QEMU_PID ]] && stop_child "$QEMU_PID"
    rm -rf "$WORK" "$SHM"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

uri_of() { echo "nbd+unix:///?socket=$1"; }
# Waits until an NBD server answers on $1 (a URI), or pid $2 dies; 10 s at most.
nbd_up() { nbdinfo --size "$1" >/dev/null 2>&1; }
wait_nbd() { wait_up 100 "$2" nbd_up "$1"; }

setup_userblk() {
    local sock=$WORK/userblk.sock out
    CMD[userblk]="$UB add mem --size $BYTES --listen unix:$sock"
    out=$($UB add mem --size "$BYTES" --listen "unix:$sock" 2>"$RES/userblk-add.err") || return 1
    echo "$out" >"$RES/userblk-add.txt"
    UB_ID=$(sed -n 's/^dev id \([0-9]*\):.*/\1/p' <<<"$out")
    [[ -n $UB_ID ]] || return 1
    PID[userblk]=$("$UB" list -n "$UB_ID" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["pid"])')
    URI[userblk]=$(uri_of "$sock")
    wait_nbd "${URI[userblk]}" "${PID[userblk]}" || return 1
    local depth; depth=$(sed -n 's/.*frontend nbd depth \([0-9]*\).*/\1/p' <<<"$out")
    LABEL[userblk]="userblk (mem, depth ${depth:-?}/conn)"
}

setup_nbdkit() {
    local sock=$WORK/nbdkit.sock t=(-f --exit-with-parent)
    [[ -n $NBDKIT_THREADS ]] && t+=(--threads "$NBDKIT_THREADS")
    # -f: stays our child (reaped, killed by the trap); --exit-with-parent if the bench dies hard.
    CMD[nbdkit]="$NBDKIT ${t[*]} --unix $sock memory $BYTES"
    $NBDKIT "${t[@]}" --unix "$sock" memory "$BYTES" 2>"$RES/nbdkit.err" &
    KIT_PID=$! PID[nbdkit]=$KIT_PID URI[nbdkit]=$(uri_of "$sock")
    wait_nbd "${URI[nbdkit]}" "$KIT_PID" || return 1
    LABEL[nbdkit]="nbdkit memory (${NBDKIT_THREADS:-default} threads)"
}

setup_qemu_nbd() {
    local sock=$WORK/qemu-nbd.sock img=$SHM/disk.img
    truncate -s "$BYTES" "$img"
    # --persistent: stay up between fio runs. --shared: fio's nbd engine
    # opens one connection per job, but let a probe overlap it.
    # shellcheck disable=SC2086  # QEMU_NBD_OPTS is a list of options
    CMD[qemu-nbd]="$QEMU_NBD -f raw -k $sock --persistent $QEMU_NBD_OPTS $img"
    # shellcheck disable=SC2086
    $QEMU_NBD -f raw -k "$sock" --persistent $QEMU_NBD_OPTS "$img" 2>"$RES/qemu-nbd.err" &
    QEMU_PID=$! PID[qemu-nbd]=$QEMU_PID URI[qemu-nbd]=$(uri_of "$sock")
    wait_nbd "${URI[qemu-nbd]}" "$QEMU_PID" || return 1
    LABEL[qemu-nbd]="qemu-nbd (raw on tmpfs, $QEMU_NBD_OPTS)"
}

load0=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bench: setting up (SIZE=$SIZE RUNTIME=${RUNTIME}s REPEAT=$REPEAT, results in $RES)" >&2
mkdir -m 700 "$USERBLK_STATE_DIR"
setup_userblk || { echo "bench: userblk add failed: $(head -3 "$RES/userblk-add.err")" >&2; exit 1; }
SERVERS+=(userblk)
if ! command -v "$NBDKIT" >/dev/null; then
    echo "bench: nbdkit not installed (Debian/Ubuntu: apt-get install nbdkit); leaving it out" >&2
elif setup_nbdkit; then SERVERS+=(nbdkit)
else echo "bench: nbdkit did not come up: $(head -3 "$RES/nbdkit.err")" >&2; fi
if ! command -v "$QEMU_NBD" >/dev/null; then
    echo "bench: qemu-nbd not installed (Debian/Ubuntu: apt-get install qemu-utils); leaving it out" >&2
elif setup_qemu_nbd; then SERVERS+=(qemu-nbd)
else echo "bench: qemu-nbd did not come up: $(head -3 "$RES/qemu-nbd.err")" >&2; fi
{
    echo "# servers"
    for s in "${SERVERS[@]}"; do echo "${CMD[$s]}"; done
    echo "# fio, in run order (URIs: $(for s in "${SERVERS[@]}"; do printf '%s=%s ' "$s" "${URI[$s]}"; done))"
} >"$RES/commands.txt"

# fio takes an engine's options (--uri) only after --ioengine.
FIO_COMMON=(--ioengine=nbd --numjobs=1 --norandommap --randrepeat=0 --group_reporting)
failed=0
run_fio() {  # out-json uri args...
    local out=$1 uri=$2; shift 2
    fio_json "$out" "${FIO_COMMON[@]}" --uri="$uri" "$@"
}
rss_kb() {  # VmRSS - RssShmem of a process in KiB (tmpfs pages it maps are counted with the data), no fork
    local k v _ rss=0 shmem=0
    while read -r k v _; do
        case $k in VmRSS:) rss=$v ;; RssShmem:) shmem=$v ;; esac
    done <"/proc/$1/status" 2>/dev/null
    echo $(( rss - shmem ))
}
# KiB of the export's data held in tmpfs, outside the RSS above: userblk's
# mem target is a memfd (which it maps: those pages are RssShmem, left out
# of rss_kb), qemu-nbd's image a file on /dev/shm. nbdkit's memory plugin
# keeps its data in its own heap (0).
outside_kb() {
    local f
    case $1 in
        userblk)
            for f in /proc/"${PID[userblk]}"/fd/*; do
                [[ $(readlink "$f") == /memfd:userblk-mem* ]] && { echo $(( $(stat -L -c '%b * %B' "$f") / 1024 )); return; }
            done ;;
        qemu-nbd) du -k "$SHM/disk.img" | cut -f1; return ;;
    esac
    echo 0
}
# Highest VmRSS of pid $1 seen every 0.2 s, written to $2 at each sample.
sample_rss() {
    local max=0 v
    while alive "$1"; do
        v=$(rss_kb "$1"); (( v > max )) && { max=$v; echo "$max" >"$2"; }
        sleep 0.2
    done
}

# Pre-fill every export once with a sequential write of all of it, so reads read data.
for s in "${SERVERS[@]}"; do
    echo "bench: pre-filling $s" >&2
    run_fio "$RES/raw/prefill.$s.json" "${URI[$s]}" --name=prefill --rw=write --bs=1M --iodepth="$QD1M"
    echo "$s $(rss_kb "${PID[$s]}") $(outside_kb "$s")" >>"$RES/rss-after-prefill.txt"
done

JOBS=("randread randread 4k $QD4K" "randwrite randwrite 4k $QD4K" "seqread read 1M $QD1M" "seqwrite write 1M $QD1M")
n=${#SERVERS[@]}
echo "repeat,job,position,server,json" >"$RES/runs.csv"
for ((r = 1; r <= REPEAT; r++)); do
    for j in "${!JOBS[@]}"; do
        read -r name rw bs qd <<<"${JOBS[$j]}"
        # A different server goes first on every job and repeat, against drift.
        order=()
        for ((k = 0; k < n; k++)); do order+=("${SERVERS[(k + r - 1 + j) % n]}"); done
        pos=0
        for s in "${order[@]}"; do
            pos=$((pos + 1))
            base=$RES/raw/$name.$s.$r
            echo "bench: repeat $r/$REPEAT: $name on $s" >&2
            if ! alive "${PID[$s]}"; then
                echo "bench: $s (pid ${PID[$s]}) is gone" >&2
                failed=1; continue
            fi
            t0=$(ticks "${PID[$s]}") b0=$(busy) w0=$EPOCHREALTIME
            sample_rss "${PID[$s]}" "$base.rss" & SAMPLER=$!
            run_fio "$base.json" "${URI[$s]}" --name="$name" --rw="$rw" --bs="$bs" --iodepth="$qd" \
                --time_based --runtime="$RUNTIME"
            kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=''
            # daemon ticks, all-CPU busy ticks, wall seconds, 1-min loadavg
            echo "$(( $(ticks "${PID[$s]}") - t0 )) $(( $(busy) - b0 ))" \
                "$(awk -v a="$w0" -v b="$EPOCHREALTIME" 'BEGIN {print b - a}')" \
                "$(cut -d' ' -f1 /proc/loadavg)" >"$base.cpu"
            echo "$r,$name,$pos,$s,raw/$name.$s.$r.json" >>"$RES/runs.csv"
        done
    done
done

find "$RES" -type f -empty -delete   # stderr files with nothing to say
for s in "${SERVERS[@]}"; do printf '%s\t%s\t%s\n' "$s" "${LABEL[$s]}" "${PID[$s]}"; done >"$RES/servers.tsv"
{
    echo "userblk NBD vs nbdkit vs qemu-nbd (fio nbd engine over Unix sockets)," \
        "$(date '+%Y-%m-%d %H:%M') on $(hostname) ($(nproc) cores, $(uname -r))"
    echo "commit $commit${stale:+ (binary older than $stale)}; $(fio --version);" \
        "$({ $NBDKIT --version 2>/dev/null || echo 'no nbdkit'; } | head -1);" \
        "$({ $QEMU_NBD --version 2>/dev/null || echo 'no qemu-nbd'; } | head -1 | cut -d' ' -f1-2)"
    echo "SIZE=$SIZE RUNTIME=${RUNTIME}s REPEAT=$REPEAT; fio ${FIO_COMMON[*]}, 1 connection per run;" \
        "loadavg $load0 at start, $(cut -d' ' -f1-3 /proc/loadavg) at end"
    for s in "${SERVERS[@]}"; do echo "  $s: ${CMD[$s]}"; done
    echo
    RES=$RES CLK_TCK=$(getconf CLK_TCK) JOBS="${JOBS[*]}" REPEAT=$REPEAT RUNTIME=$RUNTIME python3 - <<'EOF'
import csv, json, os, statistics
res, tck = os.environ["RES"], int(os.environ["CLK_TCK"])
servers = [l.rstrip("\n").split("\t") for l in open(f"{res}/servers.tsv")]
names = [s for s, _, _ in servers]
jobs = os.environ["JOBS"].split()
jobs = [jobs[i:i + 4] for i in range(0, len(jobs), 4)]
runs = list(csv.DictReader(open(f"{res}/runs.csv")))

def load(row):
    base = f"{res}/raw/{row['job']}.{row['server']}.{row['repeat']}"
    try:
        j = json.load(open(base + ".json"))["jobs"][0]
        if j.get("error"):
            return None
        d = j["read"] if j["read"]["total_ios"] else j["write"]
        ios = j["read"]["total_ios"] + j["write"]["total_ios"]
        dt, bt, wall, load1 = open(base + ".cpu").read().split()
        try:
            rss = int(open(base + ".rss").read())
        except (OSError, ValueError):
            rss = 0
        fio_s = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1000
        return dict(repeat=int(row["repeat"]), job=row["job"], server=row["server"],
                    position=int(row["position"]), iops=d["iops"], mib_s=d["bw_bytes"] / 2**20,
                    clat_mean_us=d["clat_ns"]["mean"] / 1e3,
                    clat_p99_us=d["clat_ns"]["percentile"]["99.000000"] / 1e3, ios=ios,
                    daemon_cpu_s=int(dt) / tck, fio_cpu_s=fio_s, all_busy_s=int(bt) / tck,
                    wall_s=float(wall), loadavg1=float(load1), rss_peak_kib=rss,
                    json=row["json"])
    except (OSError, ValueError, KeyError, IndexError, ZeroDivisionError):
        return None

rows = [x for x in map(load, runs) if x]
with open(f"{res}/results.csv", "w", newline="") as f:
    if rows:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

def stats(vals):
    return (statistics.median(vals), min(vals), max(vals)) if vals else None

def fmt(st, unit):
    if not st:
        return "no result"
    return f"{st[0]:.0f} ({st[1]:.0f}-{st[2]:.0f})"

summary = {"jobs": {}, "servers": {s: l for s, l, _ in servers}}
width = 27
head = f"{'job':20} {'unit':6}" + "".join(f" {s + ' median (min-max)':>{width}}" for s in names)
base_names = [b for b in ("nbdkit", "qemu-nbd") if b in names]
head += "".join(f" {'ub/' + b:>12}" for b in base_names)
print(head)
cpu_lines, lat_lines = [], []
for name, rw, bs, qd in jobs:
    unit = "IOPS" if bs == "4k" else "MiB/s"
    key = "iops" if unit == "IOPS" else "mib_s"
    title = f"{bs} {'seq' if name.startswith('seq') else 'rand'}{'read' if 'read' in name else 'write'} QD{qd}"
    st = {s: stats([x[key] for x in rows if x["job"] == name and x["server"] == s]) for s in names}
    line = f"{title:20} {unit:6}" + "".join(f" {fmt(st[s], unit):>{width}}" for s in names)
    ratios = {}
    for b in base_names:
        if st.get("userblk") and st[b] and st[b][0]:
            ratios[b] = st["userblk"][0] / st[b][0]
            line += f" {ratios[b]:11.2f}x"
        else:
            line += f" {'n/a':>12}"
    print(line)
    cpu = {s: stats([x["daemon_cpu_s"] * 1000 / (x["ios"] / 1000) for x in rows
                     if x["job"] == name and x["server"] == s and x["ios"]]) for s in names}
    cpu_lines.append(f"{title:20} {'ms/1k':6}" + "".join(
        f" {(f'{cpu[s][0]:.1f}' if cpu[s] else '-'):>{width}}" for s in names))
    lat = {s: stats([x["clat_p99_us"] for x in rows if x["job"] == name and x["server"] == s]) for s in names}
    lat_lines.append(f"{title:20} {'us':6}" + "".join(
        f" {(f'{lat[s][0]:.0f}' if lat[s] else '-'):>{width}}" for s in names))
    summary["jobs"][title] = {"unit": unit, "median_min_max": st, "ratios_userblk_over": ratios,
                              "daemon_cpu_ms_per_1k_io": cpu, "clat_p99_us": lat}
print("ub/X = median userblk / median X (>= 1.0: userblk ahead). Each run:"
      f" {os.environ['RUNTIME']} s, one fio job on one connection; {os.environ['REPEAT']} repeats.")
print()
print(f"{'daemon CPU per 1000 I/Os (median)':27}" + "".join(f" {s:>{width}}" for s in names))
print("\n".join(cpu_lines))
print()
print(f"{'p99 completion latency (median)':27}" + "".join(f" {s:>{width}}" for s in names))
print("\n".join(lat_lines))
print()

# Resident memory: after the pre-fill (idle) and the highest seen during the jobs.
idle, outside = {}, {}
for l in open(f"{res}/rss-after-prefill.txt"):
    k, v, o = l.split()
    idle[k], outside[k] = int(v), int(o)
peak = {s: max([x["rss_peak_kib"] for x in rows if x["server"] == s] or [0]) for s in names}
mib = lambda k: f"{k / 1024:.0f} MiB"
print(f"{'daemon memory':27}" + "".join(f" {s:>{width}}" for s in names))
print(f"{'RSS after pre-fill (idle)':27}" + "".join(f" {mib(idle.get(s, 0)):>{width}}" for s in names))
print(f"{'RSS peak during the jobs':27}" + "".join(f" {mib(peak[s]):>{width}}" for s in names))
print(f"{'+ data in tmpfs, not RSS':27}" + "".join(f" {mib(outside.get(s, 0)):>{width}}" for s in names))
print(f"{'= peak total':27}" + "".join(f" {mib(peak[s] + outside.get(s, 0)):>{width}}" for s in names))
print("RSS = VmRSS - RssShmem from /proc/PID/status, sampled every 0.2 s during each run. The data"
      " lives in a memfd (userblk) or a /dev/shm file (qemu-nbd), both tmpfs, counted on the third"
      " line (userblk maps its memfd: those pages are RssShmem, not counted twice);"
      " nbdkit's memory plugin keeps it in its heap, inside RSS.")
summary["memory_kib"] = {"rss_after_prefill": idle, "rss_peak": peak, "data_in_tmpfs": outside}
others = [max(0.0, x["all_busy_s"] - x["daemon_cpu_s"] - x["fio_cpu_s"]) / x["wall_s"]
          for x in rows if x["wall_s"] > 0]
loads = [x["loadavg1"] for x in rows]
if others:
    print()
    print(f"CPU used by others during the runs (all CPUs' busy time - daemon - fio, approx.):"
          f" median {statistics.median(others):.2f} cores (max {max(others):.2f});"
          f" 1-min loadavg {min(loads):.2f}-{max(loads):.2f}")
    summary["others_cores_median"] = statistics.median(others)
json.dump(summary, open(f"{res}/summary.json", "w"), indent=1)
EOF
} | tee "$RES/report.txt"
echo "bench: saved $RES/report.txt (raw fio JSON in raw/, one row per run in results.csv, commands.txt)" >&2
exit "$failed"
