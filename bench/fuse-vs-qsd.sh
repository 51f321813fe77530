#!/usr/bin/env bash
# userblk's FUSE frontend next to qemu-storage-daemon's FUSE export and a plain
# loop device, on the host (no VM), the same fio jobs on each, in one run:
#   userblk   `userblk add mem --frontend fuse --loop` (RAM disk) -> its loop device
#   qsd       raw image on tmpfs, `qemu-storage-daemon --export type=fuse`, loop on that
#   loop      loop device straight on an image on tmpfs: the ceiling, no userspace hop
# Run as root. See bench/README.md.
#
#   [RUNTIME=10] [SIZE=1G] [OUT=/tmp/userblk-bench] [UB_THREADS=4] [QSD=qemu-storage-daemon] \
#       bench/fuse-vs-qsd.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNTIME=${RUNTIME:-10} SIZE=${SIZE:-1G} OUT=${OUT:-/tmp/userblk-bench} UB_THREADS=${UB_THREADS:-4}
QSD=${QSD:-qemu-storage-daemon}
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME wants seconds, not '$RUNTIME'"
[[ $UB_THREADS =~ ^[1-9][0-9]*$ ]] || die "UB_THREADS wants a positive integer, not '$UB_THREADS'"
BYTES=$(numfmt --from=iec "$SIZE" 2>/dev/null) || die "SIZE wants e.g. 512M or 1G, not '$SIZE'"
(( BYTES >= 64 << 20 && BYTES % (1 << 20) == 0 )) || die "SIZE must be a whole number of MiB, at least 64M"
(( EUID == 0 )) || die "run as root (loop devices, mounts)"
for tool in fio python3 losetup findmnt; do command -v $tool >/dev/null || die "$tool not found"; done
# Three copies of the data live in RAM at once: userblk's mem target and two tmpfs images.
need_memory $(( 3 * BYTES + (512 << 20) )) "3 x SIZE + 512M"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bench_userblk

RES=$OUT/fuse-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RES" && RES=$(realpath "$RES")
WORK=$(mktemp -d /tmp/userblk-fuse-vs-qsd.XXXXXX)
TMPFS=$WORK/tmpfs QSD_FILE=$WORK/qsd-disk UB_MNT=$WORK/userblk-mnt
FIO_PID='' UB_ID='' QSD_PID='' QSD_LOOP='' PLAIN_LOOP='' TMPFS_ON=''
declare -A DEV=() PID=() LABEL=()
SETUPS=()   # the ones that came up, in order

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [[ -n $FIO_PID ]] && { kill -INT "$FIO_PID"; wait "$FIO_PID"; }
    [[ -n $QSD_LOOP ]] && losetup -d "$QSD_LOOP"
    [[ -n $PLAIN_LOOP ]] && losetup -d "$PLAIN_LOOP"
    if [[ -n $UB_ID ]] && ! "$UB" del -n "$UB_ID"; then   # by hand, if del cannot
        [[ -n ${DEV[userblk]:-} ]] && losetup -d "${DEV[userblk]}" 2>/dev/null
        [[ -n ${PID[userblk]:-} ]] && alive "${PID[userblk]}" && kill "${PID[userblk]}" && sleep 1
    fi
    findmnt -rn --mountpoint "$UB_MNT" >/dev/null && umount -l "$UB_MNT"
    if [[ -n $QSD_PID ]]; then
        stop_child "$QSD_PID"
    fi
    findmnt -rn --mountpoint "$QSD_FILE" >/dev/null && umount -l "$QSD_FILE"
    [[ -n $TMPFS_ON ]] && umount "$TMPFS"
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# losetup with direct I/O if the backing file takes it, else buffered; prints the device.
attach_loop() {
    losetup --direct-io=on --find --show "$1" 2>>"$RES/losetup.err" || losetup --find --show "$1"
}
dio_of() { [[ $(cat "/sys/block/${1#/dev/}/loop/dio" 2>/dev/null) == 1 ]] && echo dio || echo buffered; }

setup_userblk() {
    local out
    mkdir "$UB_MNT"   # our own, so as not to meet other users' devices in /run/userblk
    out=$("$UB" add mem --size "$BYTES" --frontend fuse --loop -q "$UB_THREADS" --mountpoint "$UB_MNT") || return 1
    echo "$out" >"$RES/userblk-add.txt"
    UB_ID=$(sed -n 's/^dev id \([0-9]*\):.*/\1/p' <<<"$out")
    [[ -n $UB_ID ]] || return 1
    read -r 'PID[userblk]' 'DEV[userblk]' < <("$UB" list -n "$UB_ID" --json |
        python3 -c 'import json, sys; d = json.load(sys.stdin)[0]; print(d["pid"], d["loop_device"])')
    LABEL[userblk]="userblk (fuse, $UB_THREADS thr, loop $(dio_of "${DEV[userblk]}"))"
}

# Runs qsd as our child (so it is reaped, not left a zombie); returns once its
# FUSE export is mounted, or 1 if qsd exits first (its stderr in $1).
qsd_start() {
    local err=$1; shift
    "$QSD" "$@" 2>"$err" &
    QSD_PID=$!
    wait_up 100 "$QSD_PID" findmnt -rn --mountpoint "$QSD_FILE" >/dev/null && return 0
    alive "$QSD_PID" || { wait "$QSD_PID"; QSD_PID=''; return 1; }
    echo "qsd: export not mounted after 10 s" >>"$err"
    kill "$QSD_PID"; wait "$QSD_PID"; QSD_PID=''; return 1
}

QSD_THREADS=''
setup_qsd() {
    local img=$TMPFS/qsd.img n i objs=() ids=()
    truncate -s "$BYTES" "$img" && : >"$QSD_FILE"
    # shellcheck disable=SC2054  # commas inside qemu option strings
    local base=(--blockdev "driver=file,node-name=file0,filename=$img,cache.direct=off"
                --blockdev driver=raw,node-name=raw0,file=file0)
    local exp="\"type\":\"fuse\",\"id\":\"exp0\",\"node-name\":\"raw0\",\"mountpoint\":\"$QSD_FILE\",\"writable\":true"
    # Newer qsd take a list of iothreads for a multi-threaded FUSE export; 10.0 wants one string.
    n=$(nproc)
    for ((i = 0; i < n; i++)); do objs+=(--object "iothread,id=iot$i"); ids+=("\"iot$i\""); done
    if (( n > 1 )) && qsd_start "$RES/qsd-multithread.err" "${objs[@]}" "${base[@]}" \
            --export "{$exp,\"iothread\":[$(IFS=,; echo "${ids[*]}")]}"; then
        QSD_THREADS="$n iothreads (FUSE export with iothread list)"
    else
        QSD_THREADS="main loop only; multi-iothread export refused: $(sed 's/.*}: //' "$RES/qsd-multithread.err" | head -1)"
        qsd_start "$RES/qsd.err" "${base[@]}" --export "{$exp}" || return 1
    fi
    QSD_LOOP=$(attach_loop "$QSD_FILE") || return 1
    PID[qsd]=$QSD_PID DEV[qsd]=$QSD_LOOP
    LABEL[qsd]="qemu-storage-daemon (fuse, loop $(dio_of "$QSD_LOOP"))"
}

setup_loop() {
    truncate -s "$BYTES" "$TMPFS/plain.img"
    PLAIN_LOOP=$(attach_loop "$TMPFS/plain.img") || return 1
    DEV[loop]=$PLAIN_LOOP PID[loop]=''
    LABEL[loop]="loop on tmpfs ($(dio_of "$PLAIN_LOOP"))"
}

load0=$(cut -d' ' -f1-3 /proc/loadavg)
mkdir "$TMPFS"
mount -t tmpfs -o "size=$(( 2 * BYTES + (16 << 20) ))" userblk-bench "$TMPFS" && TMPFS_ON=1
echo "bench: setting up (SIZE=$SIZE, RUNTIME=${RUNTIME}s, results in $RES)" >&2
setup_userblk || { echo "bench: userblk add failed" >&2; exit 1; }
SETUPS+=(userblk)
if ! command -v "$QSD" >/dev/null; then
    QSD_THREADS="skipped: qemu-storage-daemon not installed (Debian/Ubuntu: apt-get install qemu-utils)"
    echo "bench: $QSD_THREADS" >&2
elif setup_qsd; then
    SETUPS+=(qsd)
else
    QSD_THREADS="skipped: setup failed: $(head -1 "$RES/qsd.err" 2>/dev/null | cut -c1-200)"
    echo "bench: qemu-storage-daemon $QSD_THREADS" >&2
fi
setup_loop || { echo "bench: losetup on tmpfs failed" >&2; exit 1; }
SETUPS+=(loop)

FIO_COMMON=(--direct=1 --ioengine=io_uring --numjobs=1 --norandommap --randrepeat=0 --group_reporting)
failed=0
run_fio() {  # out-json device args...
    local out=$1 dev=$2; shift 2
    fio_json "$out" --filename="$dev" "${FIO_COMMON[@]}" "$@"
}

# Pre-fill every device once with a sequential write of all of it, so reads hit data.
for s in "${SETUPS[@]}"; do
    echo "bench: pre-filling $s (${DEV[$s]})" >&2
    run_fio "$RES/prefill.$s.json" "${DEV[$s]}" --name=prefill --rw=write --bs=1M --iodepth=4
done

JOBS=("randread randread 4k 32" "randwrite randwrite 4k 32" "seqread read 1M 4" "seqwrite write 1M 4")
for j in "${!JOBS[@]}"; do
    read -r name rw bs qd <<<"${JOBS[$j]}"
    # Every other job runs the setups in reverse order, against drift.
    if (( j % 2 )); then mapfile -t order < <(printf '%s\n' "${SETUPS[@]}" | tac); else order=("${SETUPS[@]}"); fi
    for s in "${order[@]}"; do
        echo "bench: $name on $s" >&2
        if [[ -n ${PID[$s]} ]] && ! alive "${PID[$s]}"; then
            echo "bench: $s daemon (pid ${PID[$s]}) is gone; did someone run userblk del?" >&2
            failed=1; continue
        fi
        t0=$(ticks "${PID[$s]}") b0=$(busy)
        run_fio "$RES/$name.$s.json" "${DEV[$s]}" --name="$name" --rw="$rw" --bs="$bs" --iodepth="$qd" \
            --time_based --runtime="$RUNTIME"
        echo "$(( $(ticks "${PID[$s]}") - t0 )) $(( $(busy) - b0 ))" >"$RES/$name.$s.cpu"
    done
done

find "$RES" -type f -empty -delete   # stderr files with nothing to say
for s in "${SETUPS[@]}"; do printf '%s\t%s\t%s\n' "$s" "${LABEL[$s]}" "${PID[$s]}"; done >"$RES/setups.tsv"
{
    echo "userblk FUSE vs qemu-storage-daemon FUSE vs loop, $(date '+%Y-%m-%d %H:%M') on $(hostname)" \
        "($(nproc) cores, $(uname -r))"
    echo "commit $commit${stale:+ (binary older than $stale)}; $(fio --version);" \
        "$({ "$QSD" --version 2>/dev/null || echo 'no qemu-storage-daemon'; } | head -1)"
    echo "SIZE=$SIZE RUNTIME=${RUNTIME}s; fio ${FIO_COMMON[*]}; loadavg $load0 at start, $(cut -d' ' -f1-3 /proc/loadavg) at end"
    echo "qemu-storage-daemon threads: $QSD_THREADS"
    echo
    RES=$RES RUNTIME=$RUNTIME CLK_TCK=$(getconf CLK_TCK) JOBS="${JOBS[*]}" python3 - <<'EOF'
import json, os
res, tck = os.environ["RES"], int(os.environ["CLK_TCK"])
setups = [l.rstrip("\n").split("\t") for l in open(f"{res}/setups.tsv")]
label = {s: l for s, l, _ in setups}
jobs = os.environ["JOBS"].split()
jobs = [jobs[i:i + 4] for i in range(0, len(jobs), 4)]
NAMES = {"qsd": "qemu-storage-daemon", "loop": "loop"}

def lat(ns):
    return f"{ns / 1e6:.2f} ms" if ns >= 1e6 else f"{ns / 1e3:.0f} us"

def load(name, s):
    try:
        j = json.load(open(f"{res}/{name}.{s}.json"))["jobs"][0]
        d = j["read"] if j["read"]["total_ios"] else j["write"]
        ios = j["read"]["total_ios"] + j["write"]["total_ios"]
        dt, bt = map(int, open(f"{res}/{name}.{s}.cpu").read().split())
        return dict(iops=d["iops"], mib=d["bw_bytes"] / 2**20, mean=d["clat_ns"]["mean"],
                    p99=d["clat_ns"]["percentile"]["99.000000"], ios=ios,
                    dcpu=dt * 1000 / tck / (ios / 1000) if ios else 0,
                    acpu=bt * 1000 / tck / (ios / 1000) if ios else 0)
    except (OSError, ValueError, KeyError, IndexError, ZeroDivisionError):
        return None

summary = []
for name, rw, bs, qd in jobs:
    title = f"{bs} {'seq' if name.startswith('seq') else 'rand'}{'read' if 'read' in name else 'write'}"
    print(f"{title} QD{qd}  ({os.environ['RUNTIME']} s)")
    print(f"{'setup':40} {'IOPS':>9} {'MiB/s':>8} {'mean lat':>9} {'p99 lat':>9}"
          f" {'daemon CPU':>11} {'all CPU':>9} {'userblk/':>9}")
    print(f"{'':40} {'':>9} {'':>8} {'':>9} {'':>9} {'ms/1k I/O':>11} {'ms/1k I/O':>9} {'this':>9}")
    r = {s: load(name, s) for s, _, _ in setups}
    ub = r.get("userblk")
    for s, l, pid in setups:
        x = r[s]
        if x is None:
            print(f"{l:40} {'no result':>9}")
            continue
        ratio = f"{ub['iops'] / x['iops']:.2f}x" if ub and x["iops"] else "-"
        dcpu = f"{x['dcpu']:.1f}" if pid else "-"
        print(f"{l:40} {x['iops']:9.0f} {x['mib']:8.1f} {lat(x['mean']):>9} {lat(x['p99']):>9}"
              f" {dcpu:>11} {x['acpu']:9.1f} {ratio:>9}")
    print()
    parts = []
    for s in ("loop", "qsd"):
        if s not in label:
            parts.append(f"{NAMES[s]} skipped")
        elif ub and r[s] and r[s]["iops"]:
            parts.append(f"{ub['iops'] / r[s]['iops']:.2f}x of {NAMES[s]}")
        else:
            parts.append(f"{NAMES[s]} n/a")
    summary.append(f"{title}: userblk " + (", ".join(parts) if ub else "no result"))
print("ratios are IOPS (= bandwidth) of userblk / the row's setup; >= 1.0: userblk ahead.")
print("daemon CPU: utime+stime of the serving process; all CPU: every CPU's busy time"
      " (fio, kernel, daemons, other load), both per 1000 I/Os.")
print()
print("\n".join(summary))
EOF
} | tee "$RES/report.txt"
echo "bench: saved $RES/report.txt" >&2
exit "$failed"
