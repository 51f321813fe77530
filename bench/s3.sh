#!/usr/bin/env bash
# userblk's s3 target against s3backer (a FUSE single-file S3 disk), on the
# host (no VM), each against its own s3s-fs server on loopback (or, with
# --server rgw, both against RADOS Gateway of one one-node Ceph cluster,
# tests/ceph/cluster.sh, in a bucket each), the same fio
# jobs on the FUSE file each exposes, with the same chunk (block) size and
# cache size. Per repeat and side, on a fresh volume:
#   1. 1 MiB sequential write of SIZE, then fsync; timed until the bucket
#      has every chunk (s3backer's fsync does not wait for uploads, so its
#      time runs on until its cache has no dirty block left);
#   2. 1 MiB sequential read of SIZE with an empty cache (every chunk comes
#      from the bucket);
#   3. the same read again, now from the cache (the warm-up);
#   4. 4k random reads over SIZE at QD 1 and QD 16, RUNTIME seconds each,
#      all cached (SIZE < cache size).
# The report gives the median and min-max of the repeats and userblk/s3backer.
# See bench/README.md.
#
#   sudo bash bench/s3.sh [--quick] [--size MIB (256)] [--cache-size MIB (512)]
#       [--chunk-size MIB (1)] [--runtime SECS (20)] [--repeat N (3)]
#       [--server s3s-fs|rgw (s3s-fs)] [--results DIR (/tmp/userblk-bench)]
#   USERBLK=path/to/userblk (default target/release/userblk), S3BACKER=s3backer,
#   SEQ_QD=1 (queue depth of the 1 MiB jobs), S3B_WRITE_DELAY=0 (ms, s3backer's
#   --blockCacheWriteDelay), UB_OPTS='...', S3B_OPTS='...' (extra options for
#   `userblk add s3` / s3backer; all printed in the report)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    echo "usage: sudo bash bench/s3.sh [--quick] [--size MIB (256)] [--cache-size MIB (512)]" \
        "[--chunk-size MIB (1)] [--runtime SECS (20)] [--repeat N (3)] [--server s3s-fs|rgw (s3s-fs)]" \
        "[--results DIR (/tmp/userblk-bench)]" >&2
    exit 2
}
SIZE=256 CACHE=512 CHUNK=1 RUNTIME=20 REPEAT=3 RESULTS=/tmp/userblk-bench QUICK='' SERVER=s3s-fs
while (( $# )); do
    case $1 in
        --quick) QUICK=1; SIZE=64 CACHE=128 RUNTIME=5 REPEAT=1; shift ;;
        --size) (( $# >= 2 )) || usage; SIZE=$2; shift 2 ;;
        --cache-size) (( $# >= 2 )) || usage; CACHE=$2; shift 2 ;;
        --chunk-size) (( $# >= 2 )) || usage; CHUNK=$2; shift 2 ;;
        --runtime) (( $# >= 2 )) || usage; RUNTIME=$2; shift 2 ;;
        --repeat) (( $# >= 2 )) || usage; REPEAT=$2; shift 2 ;;
        --results) (( $# >= 2 )) || usage; RESULTS=$2; shift 2 ;;
        --server) (( $# >= 2 )) || usage; SERVER=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "bench: unknown argument $1" >&2; usage ;;
    esac
done
SEQ_QD=${SEQ_QD:-1} S3B_WRITE_DELAY=${S3B_WRITE_DELAY:-0} UB_OPTS=${UB_OPTS:-} S3B_OPTS=${S3B_OPTS:-} S3BACKER=${S3BACKER:-s3backer}
for v in SIZE CACHE CHUNK RUNTIME REPEAT SEQ_QD; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "${v} wants a positive integer, not '${!v}'"
done
[[ $SERVER == s3s-fs || $SERVER == rgw ]] || die "--server wants s3s-fs or rgw, not '$SERVER'"
[[ $S3B_WRITE_DELAY =~ ^[0-9]+$ ]] || die "S3B_WRITE_DELAY wants milliseconds, not '$S3B_WRITE_DELAY'"
(( (CHUNK & (CHUNK - 1)) == 0 && CHUNK <= 64 )) || die "--chunk-size is in MiB: 1, 2, 4 ... 64"
(( SIZE % CHUNK == 0 )) || die "--size must be a multiple of --chunk-size"
# The random reads must all hit the cache, on both sides.
(( CACHE > SIZE )) || die "--cache-size must be larger than --size (the random reads are meant to be cached)"
(( EUID == 0 )) || die "run as root (FUSE mounts with allow_other, s3backer)"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Every missing tool at once, with where to get it.
missing=()
for t in fio:fio python3:python3 fusermount:fuse findmnt:util-linux; do
    command -v "${t%%:*}" >/dev/null || missing+=("${t%%:*} (apt-get install ${t#*:})")
done
[[ -c /dev/fuse ]] || missing+=("/dev/fuse (modprobe fuse)")
if [[ $SERVER == s3s-fs ]]; then
    S3S=$(bash tests/s3/server.sh path)
    [[ -x $S3S ]] || missing+=("s3s-fs at $S3S (tests/s3/server.sh install)")
    SERVER_VERSION=$("$S3S" --version 2>/dev/null | sed -n 1p)
else
    command -v radosgw >/dev/null || missing+=("radosgw (tests/ceph/cluster.sh install)")
    SERVER_VERSION="radosgw $(dpkg-query -W -f='${Version}' radosgw 2>/dev/null)"
fi
(( ${#missing[@]} == 0 )) || die "missing: ${missing[*]}"
HAVE_S3B=1 S3B_NOTE='' S3B_VERSION='no s3backer'
if command -v "$S3BACKER" >/dev/null; then
    S3B_VERSION=$("$S3BACKER" --version 2>&1 | sed -n 1p)
else
    HAVE_S3B='' S3B_NOTE="s3backer not installed (Debian/Ubuntu: apt-get install s3backer); userblk figures only"
    echo "bench: $S3B_NOTE" >&2
fi

if [[ -z ${USERBLK:-} ]]; then
    bench_build
    USERBLK=$PWD/target/release/userblk
fi
[[ -x $USERBLK ]] || die "no userblk binary at $USERBLK"
bench_stale "$USERBLK"
commit=$(bench_commit)
[[ -z $(git ls-files --others --exclude-standard crates 2>/dev/null) ]] || commit+=" (untracked files in crates/)"

RES=$RESULTS/s3-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RES/raw" && RES=$(realpath "$RES")
# Servers' data, userblk's cache and s3backer's mounts all on one file
# system (/var/tmp: a disk, not tmpfs, as a real cache would be).
WORK=$(mktemp -d /var/tmp/userblk-s3-bench.XXXXXX)
# A private copy of the binary (a rebuild during the run changes nothing)
# and a private state directory (a `userblk del -a` elsewhere cannot see
# our devices).
cp -p "$USERBLK" "$WORK/userblk"
UB=$WORK/userblk
export USERBLK_STATE_DIR=$WORK/userblk-state
mkdir -m 700 "$USERBLK_STATE_DIR"
export AWS_ACCESS_KEY_ID=userblk-test-key AWS_SECRET_ACCESS_KEY=userblk-test-secret
unset AWS_ENDPOINT_URL AWS_REGION AWS_SESSION_TOKEN AWS_PROFILE
printf '%s:%s\n' "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >"$WORK/s3backer-passwd"
chmod 600 "$WORK/s3backer-passwd"

BYTES=$(( SIZE << 20 )) BLOCKS=$(( SIZE / CHUNK )) CACHE_BLOCKS=$(( CACHE / CHUNK ))
UB_BUCKET=userblk-bench S3B_BUCKET=s3backer-bench   # S3 wants 3-63 characters
UB_MNT=$WORK/userblk-mnt S3B_MNT=$WORK/s3backer-mnt
mkdir "$UB_MNT" "$S3B_MNT"
FIO_PID='' UB_ID='' UB_PID='' S3B_PID=''
declare -A SRV_PID=() SRV_PORT=()

mounted() { findmnt -rn --mountpoint "$1" >/dev/null; }
s3b_up() { mounted "$S3B_MNT" && [[ -e $S3B_MNT/file ]]; }
cleanup() {
    local rc=$? s
    trap - EXIT INT TERM
    set +e
    [[ -n $FIO_PID ]] && { kill -INT "$FIO_PID"; wait "$FIO_PID"; }
    if [[ -n $UB_ID ]] && ! "$UB" del -n "$UB_ID" >/dev/null; then
        [[ -n $UB_PID ]] && alive "$UB_PID" && kill "$UB_PID" && sleep 1
    fi
    mounted "$UB_MNT" && umount -l "$UB_MNT"
    mounted "$S3B_MNT" && { fusermount -u "$S3B_MNT" 2>/dev/null || umount -l "$S3B_MNT"; }
    [[ -n $S3B_PID ]] && stop_child "$S3B_PID"
    mounted "$S3B_MNT" && umount -l "$S3B_MNT"
    if [[ $SERVER == rgw ]]; then
        [[ -d $WORK/ceph ]] && bash tests/ceph/cluster.sh stop "$WORK/ceph"
    else
        for s in "${!SRV_PID[@]}"; do bash tests/s3/server.sh stop "${SRV_PID[$s]}"; done
    fi
    cp "$USERBLK_STATE_DIR"/*.log "$RES/" 2>/dev/null
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A port nothing listens on (server.sh would take a busy one's answer for its own).
free_port() {
    local p
    while :; do
        p=$(( 20000 + RANDOM % 30000 ))
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
    done
}
# One s3s-fs per side, so neither side's objects slow the other's listings.
# RGW: one cluster (started by the first call), a bucket per side; its
# "server" CPU is the gateway's (the OSD's is not counted).
start_server() {  # side bucket
    if [[ $SERVER == rgw ]]; then
        if [[ ! -d $WORK/ceph ]]; then
            # Every repeat writes a new volume on each side, all kept in
            # the OSD's memory.
            CEPH_MEMSTORE_BYTES=$(( (2 * REPEAT * SIZE + 512) << 20 )) \
                bash tests/ceph/cluster.sh start "$WORK/ceph" >"$WORK/ceph.env" 2>"$RES/ceph-start.txt" \
                || { cat "$RES/ceph-start.txt" >&2; die "the Ceph cluster did not start"; }
        fi
        SRV_PORT[$1]=$(cat "$WORK/ceph/rgw.port")
        SRV_PID[$1]=$(cat "$WORK/ceph/run/client.rgw.a.pid")
        S3_ENDPOINT=http://127.0.0.1:${SRV_PORT[$1]} python3 tests/s3/s3req.py mb "$2" \
            || die "creating bucket $2 on RGW failed"
        return
    fi
    local port; port=$(free_port)
    mkdir -p "$WORK/s3-$1/$2"
    SRV_PID[$1]=$(S3S_LOG=$RES/s3s-fs.$1.log bash tests/s3/server.sh start "$WORK/s3-$1" "$port") \
        || die "s3s-fs for $1 did not start (log: $RES/s3s-fs.$1.log)"
    SRV_PORT[$1]=$port
}

# --- userblk: `add s3 --frontend fuse` (no loop device), a FUSE file ---------
UB_ARGS=()
ub_add() {  # prefix cache-dir [--size ...]: sets UB_ID, UB_PID; the file is $UB_MNT/disk
    local prefix=$1 cache=$2 out; shift 2
    # s3s-fs's conditional writes are not atomic: the lease locks this host.
    # shellcheck disable=SC2206  # UB_OPTS is a list of options
    UB_ARGS=(add s3 --endpoint "http://127.0.0.1:${SRV_PORT[userblk]}" --bucket "$UB_BUCKET"
        --prefix "$prefix" --chunk-size "${CHUNK}M" --cache-size "${CACHE}M" --cache-dir "$cache"
        --frontend fuse --no-loop --mountpoint "$UB_MNT" --lease host "$@" $UB_OPTS)
    out=$("$UB" "${UB_ARGS[@]}" 2>&1) || { echo "bench: userblk add failed: $out" >&2; return 1; }
    echo "$out" >>"$RES/userblk-add.txt"
    UB_ID=$(sed -n 's/^dev id \([0-9]*\):.*/\1/p' <<<"$out")
    [[ -n $UB_ID ]] || { echo "bench: userblk add printed no id: $out" >&2; return 1; }
    UB_PID=$("$UB" list -n "$UB_ID" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["pid"])')
}
ub_del() {
    "$UB" del -n "$UB_ID" >/dev/null || { echo "bench: userblk del -n $UB_ID failed" >&2; return 1; }
    UB_ID='' UB_PID=''
    ! mounted "$UB_MNT" || { echo "bench: $UB_MNT still mounted after del" >&2; return 1; }
}

# --- s3backer: our child in the foreground (-f), so we can wait for it ------
S3B_ARGS=()
s3b_mount() {  # prefix log: sets S3B_PID; the file is $S3B_MNT/file
    local prefix=$1 log=$2
    # Same block size and cache bytes as userblk; --listBlocks: userblk lists
    # its chunks at open too. The block cache is s3backer's default, in
    # memory: with --blockCacheFile it fdatasyncs the file on every block
    # state change. Write-back delay 0 (S3B_WRITE_DELAY): s3backer's fsync
    # is a no-op, so it has no way to upload on demand as userblk's flush
    # does; any delay would only add idle time before its uploads start
    # (with userblk's 2 s, a 256 MiB write gave s3backer 95 MiB/s, not ~200).
    # shellcheck disable=SC2206  # S3B_OPTS is a list of options
    S3B_ARGS=(-f --baseURL="http://127.0.0.1:${SRV_PORT[s3backer]}/" --accessFile="$WORK/s3backer-passwd"
        --prefix="$prefix/" --size="${SIZE}M" --blockSize="${CHUNK}M" --blockCacheSize="$CACHE_BLOCKS"
        --blockCacheWriteDelay="$S3B_WRITE_DELAY" --listBlocks $S3B_OPTS "$S3B_BUCKET" "$S3B_MNT")
    "$S3BACKER" "${S3B_ARGS[@]}" >>"$log" 2>&1 &
    S3B_PID=$!
    wait_up 300 "$S3B_PID" s3b_up && return 0
    echo "bench: s3backer did not mount; its output ($log):" >&2
    tail -5 "$log" >&2
    stop_child "$S3B_PID"; S3B_PID=''
    mounted "$S3B_MNT" && umount -l "$S3B_MNT"
    return 1
}
s3b_dirty() { awk '$1 == "block_cache_dirty_ratio" {print $2}' "$S3B_MNT/stats"; }
# Unmount; s3backer writes back what is dirty, then exits.
s3b_umount() {
    cp "$S3B_MNT/stats" "$1" 2>/dev/null || true
    fusermount -u "$S3B_MNT" || { echo "bench: fusermount -u $S3B_MNT failed" >&2; return 1; }
    if ! wait_gone 600 "$S3B_PID"; then echo "bench: s3backer still running 60 s after unmount" >&2; stop_child "$S3B_PID"; fi
    wait "$S3B_PID" 2>/dev/null || true
    S3B_PID=''
}

FIO_COMMON=(--direct=1 --ioengine=io_uring --numjobs=1 --group_reporting --randrepeat=0 --norandommap)
failed=0
run_fio() {  # out-json file args...
    local out=$1 file=$2; shift 2
    fio_json "$out" --filename="$file" "${FIO_COMMON[@]}" "$@"
}
objects() {  # side prefix: chunk objects in the bucket (s3s-fs: a file per object)
    if [[ $SERVER == rgw ]]; then
        local b=$UB_BUCKET p=$2/chunks/
        [[ $1 == s3backer ]] && b=$S3B_BUCKET p=$2/
        S3_ENDPOINT=http://127.0.0.1:${SRV_PORT[$1]} python3 tests/s3/s3req.py ls "$b" "$p" | { grep -cE '/[0-9a-f]+$' || true; }
        return
    fi
    case $1 in
        userblk) find "$WORK/s3-userblk/$UB_BUCKET/$2/chunks" -type f 2>/dev/null | wc -l ;;
        s3backer) find "$WORK/s3-s3backer/$S3B_BUCKET/$2" -type f -name '[0-9a-f]*[0-9a-f]' 2>/dev/null | wc -l ;;
    esac
}

# One measured fio run: fio's JSON, then (side, job, repeat, extra seconds
# before the data was safe, CPU ticks of daemon / server / all CPUs, wall).
measure() {  # side job repeat file fio-args...
    local side=$1 job=$2 r=$3 file=$4 dpid srv d0 s0 b0 w0 extra=0 t0 x; shift 4
    dpid=$([[ $side == userblk ]] && echo "$UB_PID" || echo "$S3B_PID") srv=${SRV_PID[$side]}
    echo "bench: repeat $r/$REPEAT: $job on $side" >&2
    d0=$(ticks "$dpid") s0=$(ticks "$srv") b0=$(busy) w0=$EPOCHREALTIME
    run_fio "$RES/raw/$job.$side.$r.json" "$file" --name="$job" "$@"
    if [[ $job == seqwrite && $side == s3backer ]]; then
        # fsync on s3backer's file returns at once (it is a no-op there);
        # the data is in the bucket only when no block is dirty.
        t0=$EPOCHREALTIME
        echo "$(s3b_dirty)" >"$RES/raw/$job.$side.$r.dirty-after-fsync"
        for x in $(seq 6000); do
            [[ $(s3b_dirty) == 0.0000 ]] && break
            sleep 0.01
        done
        [[ $(s3b_dirty) == 0.0000 ]] || { echo "bench: s3backer still has dirty blocks after 60 s" >&2; failed=1; }
        extra=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {print b - a}')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$side" "$job" "$r" "$extra" \
        "$(( $(ticks "$dpid") - d0 ))" "$(( $(ticks "$srv") - s0 ))" "$(( $(busy) - b0 ))" \
        "$(awk -v a="$w0" -v b="$EPOCHREALTIME" 'BEGIN {print b - a}')" >>"$RES/runs.tsv"
}

# A side's whole sequence for one repeat, on a fresh volume (prefix rN).
run_side() {  # side repeat
    local side=$1 r=$2 p=r$2 file n
    if [[ $side == userblk ]]; then
        ub_add "$p" "$WORK/cache-$p-write" --size "${SIZE}M" || return 1
        file=$UB_MNT/disk
    else
        s3b_mount "$p" "$RES/s3backer.log" || return 1
        file=$S3B_MNT/file
    fi
    measure "$side" seqwrite "$r" "$file" --rw=write --bs=1M --iodepth="$SEQ_QD" --size="$BYTES" --end_fsync=1
    n=$(objects "$side" "$p")
    echo "$side $r $n" >>"$RES/objects-after-write.txt"
    (( n == BLOCKS )) || echo "bench: warning: $side has $n of $BLOCKS chunk objects in the bucket after the write" >&2
    # Cold: the daemon stopped, a new one with an empty cache.
    if [[ $side == userblk ]]; then
        ub_del || return 1
        rm -rf "$WORK/cache-$p-write"
        ub_add "$p" "$WORK/cache-$p-read" || return 1
    else
        s3b_umount "$RES/raw/s3backer-stats.write.$r.txt" || return 1
        s3b_mount "$p" "$RES/s3backer.log" || return 1
    fi
    measure "$side" seqread-cold "$r" "$file" --rw=read --bs=1M --iodepth="$SEQ_QD" --size="$BYTES"
    measure "$side" seqread-cached "$r" "$file" --rw=read --bs=1M --iodepth="$SEQ_QD" --size="$BYTES"
    for qd in 1 16; do
        measure "$side" "randread-qd$qd" "$r" "$file" --rw=randread --bs=4k --iodepth="$qd" --size="$BYTES" \
            --time_based --runtime="$RUNTIME"
    done
    if [[ $side == userblk ]]; then
        ub_del || return 1
        rm -rf "$WORK/cache-$p-read"
    else
        s3b_umount "$RES/raw/s3backer-stats.read.$r.txt" || return 1
    fi
}

load0=$(cut -d' ' -f1-3 /proc/loadavg) start_all=$SECONDS
echo "bench: SIZE=${SIZE}MiB CACHE=${CACHE}MiB CHUNK=${CHUNK}MiB RUNTIME=${RUNTIME}s REPEAT=$REPEAT," \
    "results in $RES" >&2
SIDES=(userblk)
start_server userblk "$UB_BUCKET"
if [[ -n $HAVE_S3B ]]; then
    start_server s3backer "$S3B_BUCKET"
    SIDES+=(s3backer)
fi
: >"$RES/runs.tsv"
for ((r = 1; r <= REPEAT; r++)); do
    # userblk first on odd repeats, s3backer first on even ones, against drift.
    order=("${SIDES[@]}")
    (( r % 2 == 0 && ${#SIDES[@]} == 2 )) && order=(s3backer userblk)
    for side in "${order[@]}"; do
        if ! run_side "$side" "$r"; then
            failed=1
            if [[ $side == s3backer && $r == 1 ]] && ! grep -q "^s3backer" "$RES/runs.tsv"; then
                S3B_NOTE="s3backer failed against $SERVER (see s3backer.log); userblk figures only"
                echo "bench: $S3B_NOTE" >&2
                SIDES=(userblk)
            fi
            [[ -n $UB_ID ]] && { ub_del || true; }
            [[ -n $S3B_PID ]] && { s3b_umount /dev/null || true; }
        fi
    done
done
wall=$(( SECONDS - start_all ))

find "$RES" -type f -empty -delete   # stderr files with nothing to say
errors=$(grep -hE ' (ERROR|WARN) ' "$USERBLK_STATE_DIR"/*.log 2>/dev/null | sed -n 1,20p || true)
{
    if [[ $SERVER == rgw ]]; then where="RADOS Gateway of one Ceph cluster"; else where="own s3s-fs"; fi
    echo "userblk s3 vs s3backer (FUSE file each, $where on loopback), $(date '+%Y-%m-%d %H:%M') on" \
        "$(hostname) ($(nproc) cores, $(uname -r))"
    echo "commit $commit${stale:+ (binary older than $stale)}; binary $USERBLK" \
        "($(date -r "$USERBLK" '+%Y-%m-%d %H:%M'))"
    echo "$(fio --version); $S3B_VERSION;" \
        "$SERVER_VERSION; $(dpkg-query -W -f='libfuse2 ${Version}' libfuse2 2>/dev/null || true)"
    echo "SIZE=${SIZE}MiB, chunk = block size ${CHUNK}MiB, cache ${CACHE}MiB, RUNTIME=${RUNTIME}s," \
        "REPEAT=$REPEAT${QUICK:+ (--quick)}, 1 MiB jobs at QD $SEQ_QD; wall ${wall}s;" \
        "loadavg $load0 at start, $(cut -d' ' -f1-3 /proc/loadavg) at end"
    [[ -n $S3B_NOTE ]] && echo "NOTE: $S3B_NOTE"
    echo "  userblk: userblk ${UB_ARGS[*]}" | sed "s#$WORK#WORK#g"
    echo "           (the add before the write also has --size ${SIZE}M; each add gets a new, empty cache dir)"
    [[ ${#S3B_ARGS[@]} -gt 0 ]] && echo "  s3backer: $S3BACKER ${S3B_ARGS[*]}" | sed "s#$WORK#WORK#g"
    echo "  fio: ${FIO_COMMON[*]} on the FUSE file (userblk: disk, s3backer: file); commands.txt has every line"
    echo
    RES=$RES CLK_TCK=$(getconf CLK_TCK) SIZE=$SIZE REPEAT=$REPEAT RUNTIME=$RUNTIME SEQ_QD=$SEQ_QD SERVER=$SERVER python3 - <<'EOF'
import json, os, statistics
res, tck = os.environ["RES"], int(os.environ["CLK_TCK"])
size_mib = int(os.environ["SIZE"])
srv = "radosgw" if os.environ["SERVER"] == "rgw" else "s3s-fs"
JOBS = [("seqwrite", "1M seq write + fsync", "MiB/s"),
        ("seqread-cold", "1M seq read, cold", "MiB/s"),
        ("seqread-cached", "1M seq read, cached", "MiB/s"),
        ("randread-qd1", "4k randread QD1", "IOPS"),
        ("randread-qd16", "4k randread QD16", "IOPS")]
runs = []
for line in open(f"{res}/runs.tsv"):
    side, job, r, extra, dt, st, bt, wall = line.rstrip("\n").split("\t")
    try:
        j = json.load(open(f"{res}/raw/{job}.{side}.{r}.json"))["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        continue
    if j.get("error"):
        continue
    d = j["write"] if job == "seqwrite" else j["read"]
    fio_s = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1000
    x = dict(side=side, job=job, r=int(r), extra=float(extra), ios=d["total_ios"],
             mib=d["io_bytes"] / 2**20, daemon_s=int(dt) / tck, server_s=int(st) / tck,
             others=max(0.0, int(bt) / tck - int(dt) / tck - int(st) / tck - fio_s) / float(wall))
    if job == "seqwrite":
        # fio's runtime includes its end_fsync; s3backer's upload wait comes on top.
        secs = d["runtime"] / 1000 + x["extra"]
        x["value"] = x["mib"] / secs if secs else 0
        x["as_fio_saw"] = d["bw_bytes"] / 2**20
    elif job.startswith("seqread"):
        x["value"] = d["bw_bytes"] / 2**20
    else:
        x["value"] = d["iops"]
    runs.append(x)

sides = [s for s in ("userblk", "s3backer") if any(x["side"] == s for x in runs)]
def vals(job, side, key="value"):
    return [x[key] for x in runs if x["job"] == job and x["side"] == side]
def med(v):
    return statistics.median(v) if v else None
def fmt(v):
    if not v:
        return "no result"
    return f"{med(v):.0f} ({min(v):.0f}-{max(v):.0f})"

w = 26
print(f"{'workload':24} {'unit':6}" + "".join(f" {s + ' median (min-max)':>{w}}" for s in sides)
      + (f" {'userblk/s3backer':>17} {'paired':>7}" if len(sides) == 2 else ""))
summary = {}
for job, title, unit in JOBS:
    line = f"{title:24} {unit:6}" + "".join(f" {fmt(vals(job, s)):>{w}}" for s in sides)
    ratio = None
    paired = None
    if len(sides) == 2:
        u, b = med(vals(job, "userblk")), med(vals(job, "s3backer"))
        ratio = u / b if u and b else None
        # The two sides of one repeat ran back to back: their ratio sees
        # the same background load, more or less.
        by_r = {(x["r"], x["side"]): x["value"] for x in runs if x["job"] == job}
        pr = [by_r[(r, "userblk")] / by_r[(r, "s3backer")] for r in sorted({x["r"] for x in runs})
              if (r, "userblk") in by_r and by_r.get((r, "s3backer"))]
        paired = med(pr)
        line += f" {(f'{ratio:.2f}x' if ratio else 'n/a'):>17} {(f'{paired:.2f}' if paired else 'n/a'):>7}"
    print(line)
    summary[job] = {s: vals(job, s) for s in sides} | {"ratio": ratio, "paired": paired}
print(f"medians of {os.environ['REPEAT']} repeats; ratio = median userblk / median s3backer"
      " (> 1: userblk ahead); paired = median of the per-repeat ratios. Random reads: {}s each,"
      " over the {} MiB just read (all cached).".format(
          os.environ["RUNTIME"], size_mib))
print("seq write: MiB written / (fio's time including its end_fsync + for s3backer the wait until its"
      " cache had no dirty block: its fsync returns at once).")
if "s3backer" in sides:
    fio_saw = vals("seqwrite", "s3backer", "as_fio_saw")
    waits = vals("seqwrite", "s3backer", "extra")
    print(f"  s3backer as fio saw it (fsync a no-op): {fmt(fio_saw)} MiB/s; then"
          f" {med(waits):.2f} s (median) until nothing was dirty")
print()
print(f"{'CPU (median)':24} {'unit':6}" + "".join(f" {s + ' daemon + ' + srv:>{w}}" for s in sides))
for job, title, unit in JOBS:
    cells = []
    for s in sides:
        xs = [x for x in runs if x["job"] == job and x["side"] == s and x["ios"]]
        if unit == "MiB/s":
            d = [x["daemon_s"] * 1000 / x["mib"] for x in xs]
            v = [x["server_s"] * 1000 / x["mib"] for x in xs]
        else:
            d = [x["daemon_s"] * 1e6 / x["ios"] for x in xs]
            v = [x["server_s"] * 1e6 / x["ios"] for x in xs]
        cells.append(f"{med(d):.1f} + {med(v):.1f}" if d else "-")
    print(f"{title:24} {'ms/MiB' if unit == 'MiB/s' else 'us/IO':6}" + "".join(f" {c:>{w}}" for c in cells))
print("daemon: utime+stime of the userblk daemon / the s3backer process (all threads), from /proc/PID/stat;"
      f" {srv}: its server's.")
others = [x["others"] for x in runs]
if others:
    print(f"CPU used by others during the runs (all CPUs' busy time - daemon - {srv} - fio):"
          f" median {statistics.median(others):.2f} cores (max {max(others):.2f})")
json.dump(summary, open(f"{res}/summary.json", "w"), indent=1)
EOF
    echo
    if [[ -s $RES/objects-after-write.txt ]]; then
        echo "chunk objects in the bucket after each write (of $BLOCKS): $(awk '{printf "%s r%s %s; ", $1, $2, $3}' "$RES/objects-after-write.txt")"
    fi
    if [[ -n $errors ]]; then
        echo "userblk log errors/warnings (first 20):"
        echo "$errors"
    else
        echo "userblk logs: no ERROR or WARN line"
    fi
    grep -h 's3: closing' "$USERBLK_STATE_DIR"/*.log 2>/dev/null | sed -n "s/.*closing; /userblk closing: /; 1,$(( 2 * REPEAT ))p"
} | tee "$RES/report.txt"
echo "bench: saved $RES/report.txt (fio JSON in raw/, runs.tsv, commands.txt, logs)" >&2
exit "$failed"
