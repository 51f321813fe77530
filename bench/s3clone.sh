#!/usr/bin/env bash
# Snapshots, clones and gc of the s3 target (issue #23) against s3s-fs on
# loopback, on the host (no VM):
#   1. clone time of a SMALL and a BIG volume (1 GiB, 16 GiB), each sparse
#      (no chunk object) and full (an object for every chunk: `copy` of a
#      file with data in every chunk); median of REPEAT clones of one
#      snapshot, and the ratio BIG/SMALL (constant in the size: ~1);
#   2. CLONES clones (20) of one golden snapshot, one after the other: the
#      total time;
#   3. first read of a chunk: a clone that never wrote (its reads resolve to
#      the golden volume's objects) against the golden volume itself, same
#      cache settings, each read on a new daemon with an empty cache (cold),
#      a different chunk each repeat, the sides in ABBA order; medians and
#      clone/golden;
#   4. gc of a bucket with CLONES clones (of the 4th and 5th of 5 snapshots)
#      and 5 snapshots (the first 3 deleted): the chunk objects gc removes against the
#      ones no view references, counted apart from userblk by
#      tests/s3/s3refs.py (both sets compared, not only their sizes).
# The full BIG volume needs BIG bytes free in /var/tmp (s3s-fs keeps each
# object as a file); about 10 min in all, the writes of the full volumes
# most of it.
#
#   sudo bash bench/s3clone.sh [--quick] [--small SIZE (1G)] [--big SIZE (16G)]
#       [--clones N (20)] [--repeat N (5)] [--results DIR (/tmp/userblk-bench)]
#   (--quick: 64M and 256M, 4 clones, 3 repeats: a smoke run.)
#   USERBLK=path/to/userblk (default target/release/userblk)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    echo "usage: sudo bash bench/s3clone.sh [--quick] [--small SIZE (1G)] [--big SIZE (16G)]" \
        "[--clones N (20)] [--repeat N (5)] [--results DIR (/tmp/userblk-bench)]" >&2
    exit 2
}
SMALL=1G BIG=16G CLONES=20 REPEAT=5 RESULTS=/tmp/userblk-bench QUICK=''
while (( $# )); do
    case $1 in
        --quick) QUICK=1; SMALL=64M BIG=256M CLONES=4 REPEAT=3; shift ;;
        --small) (( $# >= 2 )) || usage; SMALL=$2; shift 2 ;;
        --big) (( $# >= 2 )) || usage; BIG=$2; shift 2 ;;
        --clones) (( $# >= 2 )) || usage; CLONES=$2; shift 2 ;;
        --repeat) (( $# >= 2 )) || usage; REPEAT=$2; shift 2 ;;
        --results) (( $# >= 2 )) || usage; RESULTS=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "bench: unknown argument $1" >&2; usage ;;
    esac
done
for v in CLONES REPEAT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v,,} wants a positive integer, not '${!v}'"
done
for v in SMALL BIG; do
    [[ ${!v} =~ ^[1-9][0-9]*[MG]$ ]] || die "--${v,,} wants a size in M or G, not '${!v}'"
done
(( EUID == 0 )) || die "run as root (FUSE mounts)"
CHUNK=$((4 << 20))   # the volumes' chunk size: copy's default
bytes() { numfmt --from=iec "$1"; }
(( $(bytes "$SMALL") % CHUNK == 0 && $(bytes "$BIG") % CHUNK == 0 )) || die "sizes must be multiples of 4M"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
S3S=$(bash tests/s3/server.sh path)
[[ -x $S3S ]] || die "missing: s3s-fs at $S3S (tests/s3/server.sh install)"
[[ -c /dev/fuse ]] || die "missing: /dev/fuse (modprobe fuse)"
if [[ -z ${USERBLK:-} ]]; then
    bench_build
    USERBLK=$PWD/target/release/userblk
fi
[[ -x $USERBLK ]] || die "no userblk binary at $USERBLK"
bench_stale "$USERBLK"
commit=$(bench_commit)

RES=$RESULTS/s3clone-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RES" && RES=$(realpath "$RES")
WORK=$(mktemp -d /var/tmp/userblk-s3clone-bench.XXXXXX)
need=$(( $(bytes "$BIG") + $(bytes "$SMALL") + (2 << 30) ))
avail=$(( $(df -k --output=avail "$WORK" | tail -n 1) * 1024 ))
(( avail > need )) || { rm -rf "$WORK"; die "needs $(numfmt --to=iec $need) free in /var/tmp, have $(numfmt --to=iec $avail)"; }
# A private binary and state directory, as bench/s3.sh.
cp -p "$USERBLK" "$WORK/userblk"
UB=$WORK/userblk
export USERBLK_STATE_DIR=$WORK/state
mkdir -m 700 "$USERBLK_STATE_DIR"
export AWS_ACCESS_KEY_ID=userblk-test-key AWS_SECRET_ACCESS_KEY=userblk-test-secret
unset AWS_ENDPOINT_URL AWS_REGION AWS_SESSION_TOKEN AWS_PROFILE
MNT=$WORK/mnt
mkdir "$MNT"
SRV_PID='' UB_ID=''

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [[ -n $UB_ID ]] && "$UB" del -n "$UB_ID" >/dev/null
    findmnt -rn --mountpoint "$MNT" >/dev/null && umount -l "$MNT"
    [[ -n $SRV_PID ]] && bash tests/s3/server.sh stop "$SRV_PID"
    cp "$USERBLK_STATE_DIR"/*.log "$RES/" 2>/dev/null
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

while :; do
    PORT=$(( 20000 + RANDOM % 30000 ))
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || break
done
EP=http://127.0.0.1:$PORT
SRV_PID=$(S3S_LOG=$RES/s3s-fs.log bash tests/s3/server.sh start "$WORK/s3" "$PORT") || die "s3s-fs did not start"
S3="env S3_ENDPOINT=$EP python3 tests/s3/s3req.py"
B=clones
$S3 mb $B
# s3s-fs's conditional writes are not atomic: every lease is this host's.
u() { echo "s3://$B/$1?endpoint=$EP&lease=host"; }
now_us() { echo "${EPOCHREALTIME/./}"; }
# ms COMMAND...: run it (quiet), print how long it took in ms (3 decimals).
ms() {
    local t0; t0=$(now_us)
    "$@" >>"$RES/commands.out" 2>&1 || { echo "bench: failed: $*" >&2; tail -n 3 "$RES/commands.out" >&2; return 1; }
    awk -v a="$t0" -v b="$(now_us)" 'BEGIN {printf "%.3f\n", (b - a) / 1000}'
}
med() { sort -g | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
range() { sort -g | awk 'NR == 1 {a = $1} {b = $1} END {print a "-" b}'; }

# make_volume PREFIX SIZE sparse|full: a volume of 4 MiB chunks, by `copy`
# of a sparse file: no data, or 4 KiB of random bytes in every chunk.
make_volume() {
    local f=$WORK/src.raw
    rm -f "$f"
    truncate -s "$2" "$f"
    if [[ $3 == full ]]; then
        python3 - "$f" "$CHUNK" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
size, chunk = os.fstat(fd).st_size, int(sys.argv[2])
for off in range(0, size, chunk):
    os.pwrite(fd, os.urandom(4096), off)
EOF
    fi
    "$UB" copy "$f" "$(u "$1")" >>"$RES/commands.out" 2>&1 || die "copy into $1 failed"
    rm -f "$f"
}
objects() { $S3 ls $B "$1/chunks/" | grep -c . || true; }

start_all=$SECONDS
echo "bench: s3clone: SMALL=$SMALL BIG=$BIG CLONES=$CLONES REPEAT=$REPEAT, results in $RES" >&2

# ---- 1. clone time against size --------------------------------------------------
: >"$RES/clone.tsv"
for size in "$SMALL" "$BIG"; do
    for kind in sparse full; do
        p=v-$size-$kind
        echo "bench: $p: writing" >&2
        t0=$SECONDS
        make_volume "$p" "$size" "$kind"
        n=$(objects "$p")
        snap=$(ms "$UB" snapshot create "$(u "$p")" s --cache-dir "$WORK/cache-snap-$p")
        for ((r = 1; r <= REPEAT; r++)); do
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$size" "$kind" "$n" "$snap" \
                "$(ms "$UB" clone "$(u "$p@s")" "$(u "$p-c$r")")" "$((SECONDS - t0))" >>"$RES/clone.tsv"
            [[ $(objects "$p-c$r") == 0 ]] || die "clone $p-c$r holds chunk objects: something was copied"
        done
    done
done

# ---- 2. CLONES clones of one golden snapshot --------------------------------------
G=v-$SMALL-full
: >"$RES/golden-clones.txt"
for ((i = 1; i <= CLONES; i++)); do
    ms "$UB" clone "$(u "$G@s")" "$(u "g$i")" >>"$RES/golden-clones.txt"
done

# ---- 3. first read of a chunk: clone vs golden -----------------------------------
ub_add() {  # PREFIX CACHE: serves the volume as $MNT/disk
    local out
    out=$("$UB" add s3 --endpoint "$EP" --bucket "$B" --prefix "$1" --cache-dir "$2" \
        --lease host --frontend fuse --no-loop --mountpoint "$MNT" 2>&1) || die "add $1 failed: $out"
    UB_ID=$(sed -n 's/^dev id \([0-9]*\):.*/\1/p' <<<"$out")
    [[ -n $UB_ID ]] || die "add printed no id: $out"
}
ub_del() { "$UB" del -n "$UB_ID" >/dev/null || die "del -n $UB_ID failed"; UB_ID=''; }
# One chunk read with O_DIRECT, in ms.
read_ms() {
    python3 - "$MNT/disk" "$1" "$CHUNK" <<'EOF'
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
off, n = int(sys.argv[2]), int(sys.argv[3])
buf = mmap.mmap(-1, n)
t = time.perf_counter()
got = os.preadv(fd, [buf], off)
print(f"{(time.perf_counter() - t) * 1000:.3f}")
assert got == n, got
EOF
}
: >"$RES/first-read.tsv"
nchunks=$(( $(bytes "$SMALL") / CHUNK ))
for ((r = 1; r <= REPEAT; r++)); do
    # A chunk far from the last one, so no read-ahead of a neighbour counts.
    idx=$(( (r * 7919) % nchunks ))
    order=(golden clone)
    (( r % 2 == 0 )) && order=(clone golden)
    for side in "${order[@]}"; do
        p=$G; [[ $side == clone ]] && p=g1
        ub_add "$p" "$WORK/cache-$side-$r"
        printf '%s\t%s\t%s\n' "$side" "$idx" "$(read_ms $((idx * CHUNK)))" >>"$RES/first-read.tsv"
        ub_del
        rm -rf "$WORK/cache-$side-$r"
    done
done

# ---- 4. gc of a bucket with CLONES clones and 5 snapshots --------------------------
gcp=gcvol
make_volume "$gcp" 256M full
ub_add "$gcp" "$WORK/cache-gc"
for s in 1 2 3 4 5; do
    "$UB" snapshot create "$(u "$gcp")" "s$s" >>"$RES/commands.out" 2>&1 || die "snapshot s$s failed"
    dd if=/dev/urandom of="$MNT/disk" bs=1M count=$((8 * s)) seek=$((s * 16)) oflag=direct conv=fsync,notrunc status=none
done
ub_del
for ((i = 1; i <= CLONES; i++)); do
    "$UB" clone "$(u "$gcp@s$(( 4 + i % 2 ))")" "$(u "$gcp-k$i")" >>"$RES/commands.out" 2>&1 || die "clone $i failed"
    ub_add "$gcp-k$i" "$WORK/cache-k$i"
    dd if=/dev/urandom of="$MNT/disk" bs=1M count=2 seek=$((i * 8 % 256)) oflag=direct conv=fsync,notrunc status=none
    ub_del
    rm -rf "$WORK/cache-k$i"
done
# s1-s3 go, and no clone reads them: what only they held is garbage.
for s in 1 2 3; do "$UB" snapshot delete "$(u "$gcp")" "s$s" >>"$RES/commands.out" 2>&1 || die "delete s$s failed"; done
# gc of the whole bucket: the volumes of parts 1-3 hold garbage too (none).
$S3 ls $B "" | grep -E '(^|/)chunks/' | sort >"$WORK/before"
S3_ENDPOINT=$EP python3 tests/s3/s3refs.py unreferenced $B >"$WORK/expect"
gc_dry=$(ms "$UB" gc "s3://$B?endpoint=$EP&lease=host" --grace 0 --dry-run)
gc_ms=$(ms "$UB" gc "s3://$B?endpoint=$EP&lease=host" --grace 0)
$S3 ls $B "" | grep -E '(^|/)chunks/' | sort >"$WORK/after"
comm -23 "$WORK/before" "$WORK/after" >"$WORK/removed"
gc_same=no
cmp -s "$WORK/removed" "$WORK/expect" && gc_same=yes
cp "$WORK/expect" "$RES/gc-unreferenced.txt"; cp "$WORK/removed" "$RES/gc-removed.txt"
wall=$((SECONDS - start_all))

{
    echo "userblk s3 snapshots, clones and gc against s3s-fs on loopback, $(date '+%Y-%m-%d %H:%M') on" \
        "$(hostname) ($(nproc) cores, $(uname -r)); loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "commit $commit${stale:+ (binary older than $stale)}; $("$S3S" --version 2>/dev/null | sed -n 1p)"
    echo "SMALL=$SMALL BIG=$BIG CLONES=$CLONES REPEAT=$REPEAT${QUICK:+ (--quick)}, 4 MiB chunks; wall ${wall}s"
    echo
    printf '%-8s %-7s %8s %14s %24s\n' size volume objects "snapshot ms" "clone ms median (min-max)"
    for size in "$SMALL" "$BIG"; do
        for kind in sparse full; do
            rows=$(awk -v s="$size" -v k="$kind" '$1 == s && $2 == k' "$RES/clone.tsv")
            printf '%-8s %-7s %8s %14s %24s\n' "$size" "$kind" "$(cut -f3 <<<"$rows" | head -n 1)" \
                "$(cut -f4 <<<"$rows" | head -n 1)" "$(cut -f5 <<<"$rows" | med) ($(cut -f5 <<<"$rows" | range))"
        done
    done
    for kind in sparse full; do
        a=$(awk -v s="$SMALL" -v k="$kind" '$1 == s && $2 == k {print $5}' "$RES/clone.tsv" | med)
        z=$(awk -v s="$BIG" -v k="$kind" '$1 == s && $2 == k {print $5}' "$RES/clone.tsv" | med)
        echo "clone time $BIG/$SMALL ($kind): $(awk -v a="$a" -v z="$z" 'BEGIN {printf "%.2f", z / a}')x"
    done
    echo
    echo "$CLONES clones of one golden snapshot ($G): total $(awk '{s += $1} END {printf "%.0f", s}' "$RES/golden-clones.txt") ms," \
        "median $(med <"$RES/golden-clones.txt") ms each"
    echo
    gm=$(awk '$1 == "golden" {print $3}' "$RES/first-read.tsv" | med)
    cm=$(awk '$1 == "clone" {print $3}' "$RES/first-read.tsv" | med)
    echo "first read of a 4 MiB chunk, cold cache (O_DIRECT on the FUSE file), median of $REPEAT:" \
        "golden $gm ms ($(awk '$1 == "golden" {print $3}' "$RES/first-read.tsv" | range))," \
        "clone $cm ms ($(awk '$1 == "clone" {print $3}' "$RES/first-read.tsv" | range));" \
        "clone/golden $(awk -v a="$gm" -v b="$cm" 'BEGIN {printf "%.2f", b / a}')"
    echo
    echo "gc of the bucket ($CLONES clones of snapshots 4 and 5 of $gcp, snapshots 1-3 deleted; and parts 1-3's volumes):" \
        "$(wc -l <"$WORK/before") chunk objects, $(wc -l <"$WORK/expect") unreferenced (tests/s3/s3refs.py)," \
        "gc removed $(wc -l <"$WORK/removed"); the same objects: $gc_same; gc took $gc_ms ms (--dry-run $gc_dry ms)"
} | tee "$RES/report.txt"
echo "bench: saved $RES/report.txt (clone.tsv, first-read.tsv, golden-clones.txt, gc-*.txt, commands.out)" >&2
[[ $gc_same == yes ]]
