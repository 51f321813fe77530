#!/usr/bin/env bash
# Runner of bench/qcow2-vs-qemu-nbd.sh, one part per call (the host script
# calls it twice): userblk's qcow2 target against qemu-nbd on identical
# qcow2 images in tmpfs, the same fio jobs on both, and a summary in OUT.
#
#   bash bench/guest/qcow2-vs-qemu-nbd.sh MODE OUT RUNTIME REPEAT SIZE_MIB QD4K QD1M QEMU_NBD_OPTS
#
# MODE ublk (inside the VM, as root): `userblk add qcow2 -f IMG` (/dev/ublkbN)
#      against `qemu-nbd -c /dev/nbd0 -f qcow2 IMG` (the kernel's nbd client),
#      fio --ioengine=io_uring --direct=1 on the two block devices.
# MODE nbd (on the host): `userblk add qcow2 -f IMG --listen unix:SOCK`
#      against `qemu-nbd -f qcow2 -k SOCK IMG`, fio --ioengine=nbd (libnbd).
# Two kinds of image, SIZE_MIB each, 64 KiB clusters:
#   prealloc  `qemu-img create -f qcow2 -o preallocation=full`: every L2
#             table and data cluster allocated and written (zeroes), made
#             once per side and used by all its runs;
#   fresh     `qemu-img create -f qcow2`, empty, made anew for every run
#             (writes allocate clusters; reads of it read nothing).
# USERBLK overrides the binary (default: this checkout's release build).
set -euo pipefail

(( $# == 8 )) || { echo "usage: $0 ublk|nbd OUT RUNTIME REPEAT SIZE_MIB QD4K QD1M QEMU_NBD_OPTS" >&2; exit 2; }
MODE=$1 OUT=$2 RUNTIME=$3 REPEAT=$4 SIZE=$5 QD4K=$6 QD1M=$7 QEMU_NBD_OPTS=$8
[[ $MODE == ublk || $MODE == nbd ]] || { echo "MODE is ublk or nbd, not '$MODE'" >&2; exit 2; }
for v in RUNTIME REPEAT SIZE QD4K QD1M; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "$v must be a positive integer, not '${!v}'" >&2; exit 2; }
done
cd "$(dirname "$0")/../.."
: "${USERBLK:=$PWD/target/release/userblk}"
[[ -x $USERBLK ]] || { echo "no binary at $USERBLK (cargo build --release first)" >&2; exit 2; }
for tool in fio qemu-img qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "$tool not found (apt-get install fio qemu-utils)" >&2; exit 2; }
done
if [[ $MODE == nbd ]]; then
    command -v nbdinfo >/dev/null || { echo "nbdinfo not found (apt-get install libnbd-bin)" >&2; exit 2; }
    fio --enghelp=nbd >/dev/null 2>&1 || { echo "this fio has no nbd engine (fio >= 3.20 built with libnbd)" >&2; exit 2; }
fi
mkdir -p "$OUT/raw"
OUT=$(realpath "$OUT")

# The images live in tmpfs: in the VM, a tmpfs of our own (/run's is
# capped at half the guest's RAM); on the host, /dev/shm.
MOUNTED=''
if [[ $MODE == ublk ]]; then
    WORK=/run/userblk-qcow2-bench
    mkdir -p "$WORK"
    mount -t tmpfs -o size=$(( 4 * SIZE + 512 ))M tmpfs "$WORK"
    MOUNTED=$WORK
else
    WORK=$(mktemp -d /dev/shm/userblk-qcow2-bench.XXXXXX)
fi
avail=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
(( avail > 4 * SIZE + 512 )) || { echo "needs 4 x SIZE + 512 MiB of free memory, have $avail MiB" >&2; exit 2; }
# A private copy: a rebuild on the host must not swap the binary mid-run.
cp -p "$USERBLK" "$WORK/userblk"
USERBLK=$WORK/userblk
# A private state directory: a `userblk del -a` elsewhere cannot touch ours.
export USERBLK_STATE_DIR=$WORK/state
mkdir -m 700 "$USERBLK_STATE_DIR"
SIDES=(userblk qemu-nbd)
NBDDEV=/dev/nbd0

UB_ID='' QN_PID='' FIO_PID=''
declare -A TGT=() PID=()
alive() { # alive PID: the process exists and has not exited (not a zombie)
    local k v st=''
    # One read of the status file: a process reaped between two looks at
    # it must not pass for alive.
    { while read -r k v; do [[ $k == State: ]] && { st=$v; break; }; done <"/proc/$1/status"; } 2>/dev/null || true
    [[ -n $st && $st != [ZX]* ]]
}

# ---- the two servers -----------------------------------------------------------

attach_userblk() { # attach_userblk IMG
    local out
    if [[ $MODE == ublk ]]; then
        out=$("$USERBLK" add qcow2 -f "$1")
    else
        rm -f "$WORK/ub.sock"
        out=$("$USERBLK" add qcow2 -f "$1" --listen "unix:$WORK/ub.sock")
    fi
    UB_ID=$(sed -n '1s/^dev id \([0-9]*\):.*/\1/p' <<<"$out")
    [[ -n $UB_ID ]] || { echo "$out" >&2; echo "userblk add qcow2 gave no device" >&2; return 1; }
    PID[userblk]=$("$USERBLK" list -n "$UB_ID" | sed -n 2p | awk '{print $7}')
    if [[ $MODE == ublk ]]; then
        [[ -b /dev/ublkb$UB_ID ]] || { echo "no /dev/ublkb$UB_ID" >&2; return 1; }
        echo none >"/sys/block/ublkb$UB_ID/queue/scheduler"
        TGT[userblk]=--filename=/dev/ublkb$UB_ID
    else
        TGT[userblk]="--uri=nbd+unix:///?socket=$WORK/ub.sock"
        wait_nbd "nbd+unix:///?socket=$WORK/ub.sock" "${PID[userblk]}" || { echo "userblk's export does not answer" >&2; return 1; }
    fi
}

detach_userblk() {
    local pid=${PID[userblk]:-} i
    [[ -n $UB_ID ]] || return 0
    "$USERBLK" del -n "$UB_ID" >/dev/null || return 1
    UB_ID=''
    # The image is closed (its lock gone) once the daemon has exited.
    for i in {1..100}; do [[ -n $pid ]] && alive "$pid" || break; sleep 0.1; done
}

attach_qemu_nbd() { # attach_qemu_nbd IMG
    local i
    rm -f "$WORK/qn.pid"
    if [[ $MODE == ublk ]]; then
        # -c: qemu-nbd serves in the background and hands the kernel's nbd
        # client the other end of a socket pair.
        # shellcheck disable=SC2086  # QEMU_NBD_OPTS is a list of options
        qemu-nbd -c "$NBDDEV" -f qcow2 $QEMU_NBD_OPTS --pid-file="$WORK/qn.pid" "$1" 2>>"$OUT/qemu-nbd.err" \
            || { tail -n 5 "$OUT/qemu-nbd.err" >&2; return 1; }
        for i in {1..100}; do
            [[ -s $WORK/qn.pid && $(cat "/sys/block/${NBDDEV#/dev/}/size") -gt 0 ]] && break
            sleep 0.1
        done
        [[ $(cat "/sys/block/${NBDDEV#/dev/}/size") -gt 0 ]] || { echo "$NBDDEV has no size after qemu-nbd -c" >&2; return 1; }
        QN_PID=$(cat "$WORK/qn.pid")
        local q=/sys/block/${NBDDEV#/dev/}/queue
        echo none >"$q/scheduler"
        # Same largest request as the ublk device (its --io-buf-size), so a
        # 1 MiB I/O is split alike on both sides.
        cat "/sys/block/ublkb$UB_ID/queue/max_sectors_kb" >"$q/max_sectors_kb" 2>/dev/null || true
        TGT[qemu-nbd]=--filename=$NBDDEV
    else
        rm -f "$WORK/qn.sock"
        # --persistent: stays up across fio's connections; --shared: a
        # readiness probe may overlap fio's connection.
        # shellcheck disable=SC2086
        qemu-nbd -f qcow2 -k "$WORK/qn.sock" --persistent --shared=16 $QEMU_NBD_OPTS "$1" 2>>"$OUT/qemu-nbd.err" &
        QN_PID=$!
        TGT[qemu-nbd]="--uri=nbd+unix:///?socket=$WORK/qn.sock"
        wait_nbd "nbd+unix:///?socket=$WORK/qn.sock" "$QN_PID" || { echo "qemu-nbd does not answer" >&2; return 1; }
    fi
    PID[qemu-nbd]=$QN_PID
}

detach_qemu_nbd() {
    local i t0=$EPOCHREALTIME
    [[ -n $QN_PID ]] || return 0
    if [[ $MODE == ublk ]]; then
        qemu-nbd -d "$NBDDEV" >/dev/null
    else
        kill "$QN_PID" 2>/dev/null || true
    fi
    for i in {1..200}; do alive "$QN_PID" || break; sleep 0.1; done
    if alive "$QN_PID"; then
        echo "qemu-nbd (pid $QN_PID) still up 20 s after it was told to stop: SIGKILL" >>"$OUT/notes.txt"
        kill -9 "$QN_PID" 2>/dev/null || true
        sleep 0.2
    fi
    [[ $MODE == ublk ]] || wait "$QN_PID" 2>/dev/null || true
    # Seconds from the stop request to the process gone (not timed: notes).
    awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f\n", b - a}' >>"$OUT/qemu-nbd-stop-s.txt"
    QN_PID=''
}

wait_nbd() { # wait_nbd URI PID: an NBD server answers, 10 s at most
    local i
    for i in {1..100}; do
        nbdinfo --size "$1" >/dev/null 2>&1 && return 0
        alive "$2" || return 1
        sleep 0.1
    done
    return 1
}

cleanup() {
    local rc=$? bad=0
    trap - EXIT
    set +e
    [[ -n $FIO_PID ]] && { kill -INT "$FIO_PID"; wait "$FIO_PID"; }
    if [[ -n $UB_ID ]]; then
        cp "$USERBLK_STATE_DIR/$UB_ID.log" "$OUT/userblk-last.log" 2>/dev/null
        detach_userblk || { echo "cleanup: userblk del -n $UB_ID failed" >&2; bad=1; }
    fi
    detach_qemu_nbd
    cd /
    [[ -n $MOUNTED ]] && { umount "$MOUNTED" || bad=1; }
    rm -rf "$WORK"
    (( rc == 0 && bad )) && rc=1
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ $MODE == ublk ]]; then
    [[ -e /dev/ublk-control ]] || modprobe ublk_drv
    [[ -b $NBDDEV ]] || modprobe nbd
    for i in {1..50}; do [[ -b $NBDDEV ]] && break; sleep 0.1; done
    [[ -b $NBDDEV ]] || { echo "no $NBDDEV after modprobe nbd" >&2; exit 1; }
    # qemu-nbd -c keeps a socket in /var/lock (/run/lock): not in the guest's fresh /run.
    mkdir -p /run/lock
fi

new_image() { # new_image PATH KIND
    rm -f "$1"
    if [[ $2 == prealloc ]]; then
        qemu-img create -q -f qcow2 -o cluster_size=64k,preallocation=full "$1" "${SIZE}M"
    else
        qemu-img create -q -f qcow2 -o cluster_size=64k "$1" "${SIZE}M"
    fi
}
declare -A IMG=([userblk]=$WORK/ub.qcow2 [qemu-nbd]=$WORK/qn.qcow2)

attach_both() { # attach_both KIND: new images, both servers up
    new_image "${IMG[userblk]}" "$1"
    new_image "${IMG[qemu-nbd]}" "$1"
    attach_userblk "${IMG[userblk]}"
    attach_qemu_nbd "${IMG[qemu-nbd]}"
}
detach_both() {
    detach_userblk
    detach_qemu_nbd
}

# ---- what is measured ------------------------------------------------------------

# exec_prerun/exec_postrun: the "cpu" line of /proc/stat (all CPUs' busy
# ticks) and the server's utime + stime, before and after each fio job,
# outside its timed I/O. Plain sh, no forks: an exec is dear under TCG.
STAT=$WORK/stat
cat >"$STAT" <<'EOF'
#!/bin/sh
# stat FILE WHEN SIDE PID
f=$1 w=$2 s=$3 p=$4 d=0
read -r _ u n sy _ _ q sq _ </proc/stat
if { read -r l </proc/"$p"/stat; } 2>/dev/null; then
    # shellcheck disable=SC2086
    set -- ${l#*) }
    d=$((${12} + ${13}))
fi
echo "$w $s $((u + n + sy + q + sq)) $d" >>"$f"
EOF
chmod 755 "$STAT"
mkdir -p "$WORK/cwd"  # fio writes the exec_* output files into its cwd

if [[ $MODE == ublk ]]; then
    FIO_COMMON=(--ioengine=io_uring --direct=1)
else
    FIO_COMMON=(--ioengine=nbd)
fi
FIO_COMMON+=(--numjobs=1 --time_based --runtime="$RUNTIME" --norandommap --randrepeat=0
    --group_reporting --eta=never --output-format=json)
JOBS=("randread randread 4k $QD4K" "randwrite randwrite 4k $QD4K" "seqread read 1M $QD1M" "seqwrite write 1M $QD1M")
KINDS=(prealloc fresh)
echo "kind,job,repeat,first,json" >"$OUT/runs.csv"
: >"$OUT/commands.txt"
FAILED=0

# One fio run, the two servers one after the other (--stonewall), FIRST first.
run_pair() { # run_pair KIND NAME RW BS QD REPEAT FIRST TAG
    local kind=$1 name=$2 rw=$3 bs=$4 qd=$5 r=$6 first=$7 base s rc=0 args=()
    base=$OUT/raw/$kind.$name.$r
    [[ $r == warmup ]] && base=$OUT/raw/warmup.$kind
    local order=("$first")
    for s in "${SIDES[@]}"; do [[ $s == "$first" ]] || order+=("$s"); done
    for s in "${order[@]}"; do
        args+=(--name="$s" "${TGT[$s]}" --exec_prerun="$STAT $base.cpu pre $s ${PID[$s]}"
               --exec_postrun="$STAT $base.cpu post $s ${PID[$s]}")
        [[ $s == "$first" ]] || args+=(--stonewall)
    done
    rm -f "$base.cpu"
    { printf '%q ' fio "${FIO_COMMON[@]}" --rw="$rw" --bs="$bs" --iodepth="$qd" "${args[@]}"; printf '%q\n' --output="$base.json"; } >>"$OUT/commands.txt"
    # A wedged server must not eat the VM's whole timeout; in the background
    # and waited for, so that Ctrl-C (on the host) stops the whole bench.
    (cd "$WORK/cwd" && exec timeout -k 10 $(( 2 * RUNTIME + 120 )) fio "${FIO_COMMON[@]}" --rw="$rw" --bs="$bs" \
        --iodepth="$qd" "${args[@]}" --output="$base.json") &
    FIO_PID=$!
    wait "$FIO_PID" || rc=$?
    FIO_PID=''
    if (( rc != 0 )); then
        echo "FAIL fio $kind $name repeat $r: exit $rc" >&2
        grep -a -E '^fio:|"error"' "$base.json" >&2 2>/dev/null || true
        FAILED=1
    fi
    [[ $r == warmup ]] && return 0
    echo "$kind,$name,$r,$first,raw/${base##*/}.json" >>"$OUT/runs.csv"
    python3 - "$base.json" "$kind $name rep $r" <<'EOF' || true
import json, sys
try:
    jobs = json.load(open(sys.argv[1]))["jobs"]
except (OSError, ValueError):
    sys.exit(0)
out = []
for j in jobs:
    d = j["read"] if j["read"]["total_ios"] else j["write"]
    out.append(f"{j['jobname']} {d['iops']:.0f} IOPS {d['bw_bytes'] / 2**20:.0f} MiB/s")
print(f"run {sys.argv[2]}: " + ", ".join(out), file=sys.stderr)
EOF
}

describe() { # one line of the settings that must match, per block device
    local q=/sys/block/$1/queue
    printf '%-8s hw_queues=%s nr_requests=%s scheduler=%s logical_block=%s max_sectors_kb=%s write_cache="%s" rotational=%s\n' \
        "$1" "$(find "/sys/block/$1/mq" -mindepth 1 -maxdepth 1 | wc -l)" "$(cat "$q/nr_requests")" \
        "$(sed 's/.*\[\(.*\)\].*/\1/' "$q/scheduler")" "$(cat "$q/logical_block_size")" \
        "$(cat "$q/max_sectors_kb")" "$(cat "$q/write_cache")" "$(cat "$q/rotational")"
}

# ---- runs ------------------------------------------------------------------------

echo "bench($MODE): preallocated images, ${SIZE} MiB each" >&2
attach_both prealloc
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); mode: $MODE"
    echo "kernel: $(uname -r); cpus: $(nproc); mem: $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
    echo "userblk: $("$USERBLK" --version), sha256 $(sha256sum <"$USERBLK" | cut -c1-16), built $(date -u -r "$USERBLK" '+%Y-%m-%d %H:%M:%S UTC')"
    echo "$(fio --version); $(qemu-nbd --version | head -n 1); $(qemu-img --version | head -n 1)"
    echo "runtime: ${RUNTIME}s x $REPEAT repeats; images: ${SIZE} MiB, 64 KiB clusters, on tmpfs ($WORK)"
    echo "prealloc image: qemu-img create -f qcow2 -o cluster_size=64k,preallocation=full IMG ${SIZE}M (one per side, kept)"
    echo "fresh image:    qemu-img create -f qcow2 -o cluster_size=64k IMG ${SIZE}M (new for every run)"
    if [[ $MODE == ublk ]]; then
        echo "userblk:  $USERBLK add qcow2 -f IMG   (defaults: -q 1 -d 128, 512K buffers)"
        echo "qemu-nbd: qemu-nbd -c $NBDDEV -f qcow2 $QEMU_NBD_OPTS --pid-file=F IMG"
        describe "ublkb$UB_ID"
        describe "${NBDDEV#/dev/}"
        echo "nbd module: nbds_max=$(cat /sys/module/nbd/parameters/nbds_max 2>/dev/null || echo '?')"
    else
        echo "userblk:  $USERBLK add qcow2 -f IMG --listen unix:SOCK"
        echo "qemu-nbd: qemu-nbd -f qcow2 -k SOCK --persistent --shared=16 $QEMU_NBD_OPTS IMG"
    fi
    "$USERBLK" list -n "$UB_ID" | sed -n 's/^[[:space:]]*target /userblk target: /p'
    qemu-img info "${IMG[userblk]}" | sed -n 's/^\(virtual size\|disk size\|cluster_size\): */image: \1: /p'
} >"$OUT/env.txt"
cat "$OUT/env.txt" >&2

# Warm-up, untimed: first use of the request buffers, the images' pages and
# (in the VM) TCG translating both servers' code.
run_pair prealloc warmup randrw 4k "$QD4K" warmup userblk
for r in $(seq "$REPEAT"); do
    for j in "${!JOBS[@]}"; do
        read -r name rw bs qd <<<"${JOBS[$j]}"
        # Who goes first alternates with the job and the repeat, so drift
        # (host load, caches) falls on both alike.
        first=${SIDES[$(( (r + j) % 2 ))]}
        run_pair prealloc "$name" "$rw" "$bs" "$qd" "$r" "$first"
    done
done
[[ $MODE == ublk ]] && describe "ublkb$UB_ID" >>"$OUT/env.txt"
cp "$USERBLK_STATE_DIR/$UB_ID.log" "$OUT/userblk-prealloc.log" 2>/dev/null || true
detach_both
for s in "${SIDES[@]}"; do
    echo "prealloc $s: $(qemu-img check "${IMG[$s]}" 2>&1 | grep -E 'No errors|leaked|corrupt' | head -n 1)" >>"$OUT/check.txt"
done

echo "bench($MODE): fresh images" >&2
for r in $(seq "$REPEAT"); do
    for j in "${!JOBS[@]}"; do
        read -r name rw bs qd <<<"${JOBS[$j]}"
        first=${SIDES[$(( (r + j + 1) % 2 ))]}
        attach_both fresh
        run_pair fresh "$name" "$rw" "$bs" "$qd" "$r" "$first"
        detach_both
        # How far the run filled the image (writes allocate until it is full).
        for s in "${SIDES[@]}"; do
            echo "$s $(stat -c %s "${IMG[$s]}") $(du -k "${IMG[$s]}" | cut -f1)"
        done >"$OUT/raw/fresh.$name.$r.size"
        if [[ $name == *write ]]; then
            for s in "${SIDES[@]}"; do
                echo "fresh $name $r $s: $(qemu-img check "${IMG[$s]}" 2>&1 | grep -E 'No errors|leaked|corrupt' | head -n 1)" >>"$OUT/check.txt"
            done
        fi
    done
done
rm -f "${IMG[userblk]}" "${IMG[qemu-nbd]}"
[[ $MODE == ublk ]] && dmesg >"$OUT/dmesg.txt"

# ---- summary --------------------------------------------------------------------

OUT=$OUT MODE=$MODE CLK_TCK=$(getconf CLK_TCK) JOBS="${JOBS[*]}" KINDS="${KINDS[*]}" \
    RUNTIME=$RUNTIME REPEAT=$REPEAT SIZE=$SIZE python3 - <<'EOF' | tee "$OUT/summary.txt"
import csv, json, os, statistics
out, mode, tck = os.environ["OUT"], os.environ["MODE"], int(os.environ["CLK_TCK"])
jobs = os.environ["JOBS"].split()
jobs = [jobs[i:i + 4] for i in range(0, len(jobs), 4)]
kinds = os.environ["KINDS"].split()
sides = ["userblk", "qemu-nbd"]
rows = []
for run in csv.DictReader(open(f"{out}/runs.csv")):
    base = f"{out}/{run['json'][:-5]}"
    try:
        fj = {j["jobname"]: j for j in json.load(open(base + ".json"))["jobs"]}
    except (OSError, ValueError):
        fj = {}
    cpu = {}
    try:
        for line in open(base + ".cpu"):
            when, side, busy, daemon = line.split()
            cpu.setdefault(side, {})[when] = (int(busy), int(daemon))
    except (OSError, ValueError):
        pass
    size = {}
    try:
        for line in open(base + ".size"):
            side, apparent, kib = line.split()
            size[side] = int(kib) / 1024
    except OSError:
        pass
    for s in sides:
        j = fj.get(s)
        if not j or j.get("error"):
            continue
        d = j["read"] if j["read"]["total_ios"] else j["write"]
        ios = j["read"]["total_ios"] + j["write"]["total_ios"]
        c = cpu.get(s, {})
        busy_us = daemon_us = others = None
        fio_s = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1000
        if "pre" in c and "post" in c and ios:
            busy_s = (c["post"][0] - c["pre"][0]) / tck
            daemon_s = (c["post"][1] - c["pre"][1]) / tck
            busy_us, daemon_us = busy_s * 1e6 / ios, daemon_s * 1e6 / ios
            # CPU time neither the server nor fio used, in cores (a noise gauge).
            if j["job_runtime"]:
                others = max(0.0, busy_s - daemon_s - fio_s) / (j["job_runtime"] / 1000)
        rows.append(dict(kind=run["kind"], job=run["job"], repeat=int(run["repeat"]), side=s,
                         first=run["first"] == s, iops=d["iops"], mib_s=d["bw_bytes"] / 2**20,
                         clat_p50_us=d["clat_ns"]["percentile"]["50.000000"] / 1e3,
                         clat_p99_us=d["clat_ns"]["percentile"]["99.000000"] / 1e3,
                         ios=ios, runtime_s=j["job_runtime"] / 1000, fio_cpu_s=fio_s,
                         all_cpu_us_per_io=busy_us, daemon_cpu_us_per_io=daemon_us,
                         others_cores=others, image_mib_after=size.get(s), json=run["json"]))
with open(f"{out}/results.csv", "w", newline="") as f:
    if rows:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

def pick(kind, name, side, key):
    return [r[key] for r in rows if r["kind"] == kind and r["job"] == name and r["side"] == side and r[key] is not None]

def st(v):
    return (statistics.median(v), min(v), max(v)) if v else None

def title(name, bs, qd):
    return f"{bs} {'seq' if name.startswith('seq') else 'rand'}{'read' if 'read' in name else 'write'} QD{qd}"

where = ("ublk device vs qemu-nbd + kernel nbd client (/dev/nbd0), fio io_uring direct, in the VM"
         if mode == "ublk" else "NBD exports on Unix sockets, fio's nbd engine (libnbd), on the host")
print(f"qcow2: userblk vs qemu-nbd -- {where}")
W = 26
print(f"{'image':9} {'job':19} {'unit':5}" + "".join(f" {s + ' median (min-max)':>{W}}" for s in sides)
      + f" {'ub/qemu-nbd':>11} {'paired':>7}")
summary = {"mode": mode, "jobs": {}}
cpu_lines, lat_lines, fill_lines = [], [], []
for kind in kinds:
    for name, rw, bs, qd in jobs:
        unit, key = ("IOPS", "iops") if bs == "4k" else ("MiB/s", "mib_s")
        t = title(name, bs, qd)
        s = {x: st(pick(kind, name, x, key)) for x in sides}
        line = f"{kind:9} {t:19} {unit:5}"
        for x in sides:
            line += f" {(f'{s[x][0]:.0f} ({s[x][1]:.0f}-{s[x][2]:.0f})' if s[x] else 'no result'):>{W}}"
        ratio = s["userblk"][0] / s["qemu-nbd"][0] if s["userblk"] and s["qemu-nbd"] and s["qemu-nbd"][0] else None
        # Paired: the median of the per-repeat ratios (both sides in one fio run, back to back).
        per = []
        for r in sorted({x["repeat"] for x in rows}):
            a = [x[key] for x in rows if (x["kind"], x["job"], x["repeat"], x["side"]) == (kind, name, r, "userblk")]
            b = [x[key] for x in rows if (x["kind"], x["job"], x["repeat"], x["side"]) == (kind, name, r, "qemu-nbd")]
            if a and b and b[0]:
                per.append(a[0] / b[0])
        paired = statistics.median(per) if per else None
        line += f" {(f'{ratio:.2f}x' if ratio else 'n/a'):>11} {(f'{paired:.2f}' if paired else 'n/a'):>7}"
        print(line)
        c = {x: st(pick(kind, name, x, "daemon_cpu_us_per_io")) for x in sides}
        a = {x: st(pick(kind, name, x, "all_cpu_us_per_io")) for x in sides}
        l = {x: st(pick(kind, name, x, "clat_p99_us")) for x in sides}
        f = {x: st(pick(kind, name, x, "image_mib_after")) for x in sides}
        fmt1 = lambda v: f"{v[0]:.1f}" if v else "-"
        fmt0 = lambda v: f"{v[0]:.0f}" if v else "-"
        cpu_lines.append(f"{kind:9} {t:19}" + "".join(f" {fmt1(c[x]):>12}" for x in sides)
                         + "".join(f" {fmt1(a[x]):>12}" for x in sides))
        lat_lines.append(f"{kind:9} {t:19}" + "".join(f" {fmt0(l[x]):>12}" for x in sides))
        if kind == "fresh" and "write" in name:
            fill_lines.append(f"{kind:9} {t:19}" + "".join(f" {fmt0(f[x]):>12}" for x in sides))
        summary["jobs"][f"{kind} {t}"] = dict(unit=unit, median_min_max=s, ratio=ratio, paired=paired,
                                              daemon_cpu_us_per_io=c, all_cpu_us_per_io=a, clat_p99_us=l)
print(f"ub/qemu-nbd = median userblk / median qemu-nbd (above 1: userblk ahead); paired = median of the"
      f" per-repeat ratios. {os.environ['RUNTIME']} s per run, {os.environ['REPEAT']} repeats,"
      f" {os.environ['SIZE']} MiB images.")
print()
allcpu = "all vCPUs" if mode == "ublk" else "all CPUs"
print(f"{'CPU us per I/O (median)':29}" + "".join(f" {x + ' srv':>12}" for x in ["userblk", "qemu-nbd"])
      + "".join(f" {x[:8] + ' all':>12}" for x in ["userblk", "qemu-nbd"]))
print("\n".join(cpu_lines))
print(f"srv: the server process (utime + stime, all threads); all: busy time of {allcpu}"
      + (" (the kernel's nbd client and fio included)" if mode == "ublk" else " (fio and anything else running)")
      + " / I/Os.")
print()
print(f"{'p99 completion latency, us':29}" + "".join(f" {x:>12}" for x in sides))
print("\n".join(lat_lines))
if fill_lines:
    print()
    print(f"{'fresh image after the run, MiB':29}" + "".join(f" {x:>12}" for x in sides) + "  (allocated, median)")
    print("\n".join(fill_lines))
oth = [r["others_cores"] for r in rows if r["others_cores"] is not None]
if oth and mode == "nbd":
    print()
    print(f"CPU used by others during the runs (all CPUs' busy time - server - fio): median"
          f" {statistics.median(oth):.2f} cores, max {max(oth):.2f}")
    summary["others_cores_median"] = statistics.median(oth)
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
EOF
{
    if [[ -s $OUT/check.txt ]]; then
        echo
        echo "qemu-img check after the runs:"
        sed 's/^/  /' "$OUT/check.txt"
    fi
    [[ ! -s $OUT/notes.txt ]] || sed 's/^/note: /' "$OUT/notes.txt"
} | tee -a "$OUT/summary.txt"
find "$OUT" -type f -empty -delete
(( FAILED == 0 )) || { echo "some fio runs failed (see above)" >&2; exit 1; }
