#!/usr/bin/env bash
# Guest side of bench/rbd.sh: runs inside the VM (vm/run.sh), as root, from
# the repository root. One Ceph cluster (tests/ceph/cluster.sh, in guest
# memory), one RBD image, and the same fio jobs on three block devices of
# that image, each mapped only while it is measured:
#   userblk  `userblk add rbd --pool P --image I` over ublk
#   rbd-nbd  Ceph's own librbd daemon behind the kernel's nbd client
#   krbd     the kernel's rbd driver (`rbd device map`)
# Writes raw fio JSON, env.txt and a summary (bench/guest/rbd_summary.py) to OUT.
#
#   bash bench/guest/rbd.sh OUT RUNTIME REPEAT SIZE_MIB
#
# USERBLK overrides the binary (default: this checkout's release build). A
# binary without the rbd target says "userblk: rbd target not available"
# and its column is left out. CEPH_TIMEOUT bounds each wait of the cluster's
# start (default here 600 s: under TCG it is slow).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(( $# == 4 )) || die "usage: $0 OUT RUNTIME REPEAT SIZE_MIB"
OUT=$1 RUNTIME=$2 REPEAT=$3 SIZE=$4
[[ $SIZE =~ ^[1-9][0-9]*$ ]] || die "SIZE_MIB must be a positive integer"
guest_init "$OUT" "$RUNTIME" "$REPEAT" userblk
OUT=$(realpath "$OUT")

# /run is a plain tmpfs in the guest; the cluster's objects are in the
# OSD's memstore anyway.
WORK=/run/userblk-rbd-bench
CEPH_DIR=$WORK/ceph
POOL=rbd IMAGE=bench
guest_private_userblk "$WORK"
ip link set lo up 2>/dev/null || true
modprobe nbd
modprobe rbd
export CEPH_TIMEOUT=${CEPH_TIMEOUT:-600}
# memstore holds the image and the OSD's own objects; it grows by about
# 2.4x the data stored (docs/testing.md), so the image is the budget.
export CEPH_MEMSTORE_BYTES=$(( (SIZE + 256) << 20 ))

MAPPED='' MAPPED_SIDE='' UB_ID=''
unmap() {
    local rc=0
    case $MAPPED_SIDE in
        userblk) "$USERBLK" del -n "$UB_ID" || rc=$? ;;
        rbd-nbd) timeout 120 rbd-nbd unmap "$MAPPED" || rc=$? ;;
        krbd) timeout 120 rbd device unmap -o noudev "$MAPPED" || rc=$? ;;
    esac
    (( rc == 0 )) || echo "unmap $MAPPED_SIDE $MAPPED failed (exit $rc)" >&2
    MAPPED='' MAPPED_SIDE='' UB_ID=''
    return "$rc"
}
cleanup() {
    local rc=$? bad=0
    set +e
    [[ -z $MAPPED_SIDE ]] || unmap || bad=1
    if [[ -d $CEPH_DIR ]]; then bash tests/ceph/cluster.sh stop "$CEPH_DIR" || bad=1; fi
    rm -rf "$WORK"
    (( rc == 0 && bad )) && rc=1
    exit "$rc"
}
trap cleanup EXIT

# ---- cluster and image -------------------------------------------------------

t0=$SECONDS
bash tests/ceph/cluster.sh start "$CEPH_DIR" >"$WORK/ceph.env"
. "$WORK/ceph.env"
start_s=$(( SECONDS - t0 ))
timeout "$CEPH_TIMEOUT" ceph osd pool create "$POOL" 8 >/dev/null
timeout "$CEPH_TIMEOUT" rbd pool init "$POOL"
# The features krbd maps (6.x: layering, exclusive-lock, object-map,
# fast-diff, deep-flatten; 16.2's default set), so all three serve one image.
timeout "$CEPH_TIMEOUT" rbd create --size "${SIZE}M" "$POOL/$IMAGE"
# Every object written once: reads then fetch data, not holes.
timeout $(( CEPH_TIMEOUT * 4 )) rbd bench --io-type write --io-size 4M --io-pattern seq \
    --io-threads 4 --io-total "${SIZE}M" "$POOL/$IMAGE" >"$OUT/prefill.txt"

SIDES=(userblk rbd-nbd krbd)
UB_NOTE=''
if ! "$USERBLK" add rbd --help >/dev/null 2>&1; then
    UB_NOTE="userblk: rbd target not available ($("$USERBLK" --version)); its column is left out"
    echo "$UB_NOTE" | tee "$OUT/notes.txt"
    SIDES=(rbd-nbd krbd)
fi

# Sets MAPPED to the block device of SIDE.
map() {  # SIDE
    local out
    MAPPED_SIDE=$1
    case $1 in
        userblk)
            # shellcheck disable=SC2086  # RBD_BENCH_UB_ARGS holds several words on purpose
            out=$("$USERBLK" add rbd --pool "$POOL" --image "$IMAGE" --conf "$CEPH_CONF" ${RBD_BENCH_UB_ARGS:-})
            echo "$out" >>"$OUT/userblk-add.txt"
            UB_ID=$(sed -n '1s/^dev id \([0-9]*\):.*/\1/p' <<<"$out")
            MAPPED=/dev/ublkb$UB_ID ;;
        rbd-nbd) MAPPED=$(timeout 120 rbd-nbd map "$POOL/$IMAGE") ;;
        # The monitor speaks msgr2 only (tests/ceph/cluster.sh); the
        # kernel client's default is msgr1. The guest has no udev to wait for.
        krbd) MAPPED=$(timeout 120 rbd device map -o ms_mode=prefer-crc,noudev "$POOL/$IMAGE") ;;
    esac
    [[ -b $MAPPED ]] || { echo "map $1 gave no block device ($MAPPED)" >&2; return 1; }
    # Same elevator everywhere (ublk and nbd would get mq-deadline).
    local q=/sys/block/${MAPPED#/dev/}/queue
    echo none >"$q/scheduler"
    printf '%-8s %-12s hw_queues=%s nr_requests=%s scheduler=%s max_sectors_kb=%s write_cache="%s"\n' \
        "$1" "${MAPPED#/dev/}" "$(find "/sys/block/${MAPPED#/dev/}/mq" -mindepth 1 -maxdepth 1 | wc -l)" \
        "$(cat "$q/nr_requests")" "$(sed 's/.*\[\(.*\)\].*/\1/' "$q/scheduler")" \
        "$(cat "$q/max_sectors_kb")" "$(cat "$q/write_cache")" >>"$OUT/devices.txt"
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "kernel: $(uname -r); cpus: $(nproc); mem: $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
    echo "userblk: $("$USERBLK" --version), sha256 $(sha256sum <"$USERBLK" | cut -c1-16); $(fio --version)"
    echo "userblk add options: ${RBD_BENCH_UB_ARGS:-(none)}; CEPH_ARGS: ${CEPH_ARGS:-(none)}"
    echo "ceph: $(ceph --version | awk '{print $3}'); cluster start ${start_s}s; image $POOL/$IMAGE ${SIZE} MiB," \
        "features $(rbd info "$POOL/$IMAGE" | sed -n 's/.*features: //p')"
    echo "runtime: ${RUNTIME}s x $REPEAT repeats per job and device; sides: ${SIDES[*]}"
} >"$OUT/env.txt"
cat "$OUT/env.txt"

# ---- runs --------------------------------------------------------------------

FIO_COMMON=(--ioengine=io_uring --direct=1 --numjobs=1 --time_based --runtime="$RUNTIME"
    --size="${SIZE}M" --norandommap --randrepeat=0 --eta=never --output-format=json)
JOBS=(randwrite randread write read)
declare -A JOB_ARGS=([randwrite]="--rw=randwrite --bs=4k --iodepth=32" [randread]="--rw=randread --bs=4k --iodepth=32"
    [write]="--rw=write --bs=1M --iodepth=8" [read]="--rw=read --bs=1M --iodepth=8")
: >"$OUT/commands.txt"
for j in "${JOBS[@]}"; do
    echo "fio --name=$j --filename=DEV ${JOB_ARGS[$j]} ${FIO_COMMON[*]} --output=FILE" >>"$OUT/commands.txt"
done

FAILED=0
run_side() {  # SIDE REP
    local side=$1 rep=$2 j json rc
    map "$side" || { FAILED=1; MAPPED_SIDE=''; return 0; }
    for j in "${JOBS[@]}"; do
        json=$OUT/raw/$j.$side.$rep.json rc=0
        # A wedged device must not eat the VM's whole timeout.
        # shellcheck disable=SC2086  # JOB_ARGS holds several words on purpose
        timeout -k 10 $(( RUNTIME + 120 )) fio --name="$j" --filename="$MAPPED" ${JOB_ARGS[$j]} \
            "${FIO_COMMON[@]}" --output="$json" || rc=$?
        if (( rc )); then
            echo "FAIL fio $j on $side rep $rep: exit $rc" >&2
            FAILED=1
        else
            printf 'run %-9s %-8s rep %d: %s\n' "$j" "$side" "$rep" "$(python3 bench/guest/rbd_summary.py --one "$json")"
        fi
    done
    unmap || FAILED=1
}

for rep in $(seq "$REPEAT"); do
    # The order rotates each repeat (A B C, B C A, C A B, ...): drift in the
    # guest or the cluster falls on every side alike.
    n=${#SIDES[@]}
    for ((i = 0; i < n; i++)); do run_side "${SIDES[(i + rep - 1) % n]}" "$rep"; done
done

ceph -s >"$OUT/ceph-status.txt" 2>&1 || true
echo "guest memory after the runs: $(free -m | awk '/^Mem:/ {print $3 " MiB used of " $2}');" \
    "resident MiB: $(for f in "$CEPH_DIR"/run/*.pid; do
        printf '%s %s, ' "$(basename "$f" .pid)" "$(( $(ps -o rss= -p "$(cat "$f")" || echo 0) / 1024 ))"; done)" >>"$OUT/env.txt"
dmesg >"$OUT/dmesg.txt"
cp /run/userblk/*.log "$OUT/" 2>/dev/null || true
python3 bench/guest/rbd_summary.py "$OUT" | tee "$OUT/summary.txt"
(( FAILED == 0 )) || { echo "some runs failed (see above)" >&2; exit 1; }
