# Shared helpers for the real-kernel suites (sourced, inside the VM).
# Each case prints one line: PASS/FAIL/SKIP, its name, the time it took and,
# on failure, the output of the failing step. The summary line at the end is
# "N passed, N failed, N skipped"; the suite exits non-zero if anything failed,
# or if fewer cases ran than it declared with `plan` (a suite that stopped
# early, or lost a case, must not pass on the cases it did run).

PASSED=0
FAILED=0
SKIPPED=0
PLANNED=
FAILED_NAMES=()
CASE_LOG=$(mktemp /tmp/case.XXXXXX)

# USERBLK: the binary under test (release build of this checkout by default).
: "${USERBLK:=$PWD/target/release/userblk}"
export USERBLK

ub() { "$USERBLK" "$@"; }

# `plan N`: the suite defines N cases (every case_run it can reach, a skipped
# case counting as one); summary fails when fewer ran.
plan() { PLANNED=$1; }

# Run a case: `case_run NAME FUNCTION [ARGS...]`. The function fails the case
# by returning non-zero (set -e is on inside it).
case_run() {
    local name=$1; shift
    # ONLY=regex runs just the matching cases (for debugging a failure).
    if [ -n "${ONLY:-}" ] && ! grep -qE -- "$ONLY" <<<"$name"; then return 0; fi
    local start=$SECONDS rc
    : >"$CASE_LOG"
    ( set -eo pipefail; "$@" ) >"$CASE_LOG" 2>&1
    rc=$?
    local took=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        PASSED=$((PASSED + 1))
        printf 'PASS %-48s %4ss\n' "$name" "$took"
        # Figures a case reports about itself ("note: ...") are shown even on success.
        sed -n 's/^note: /     note: /p' "$CASE_LOG"
    elif [ "$rc" -eq 77 ]; then
        SKIPPED=$((SKIPPED + 1))
        printf 'SKIP %-48s %s\n' "$name" "$(tail -n 1 "$CASE_LOG")"
    else
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
        printf 'FAIL %-48s %4ss (exit %s)\n' "$name" "$took" "$rc"
        sed 's/^/    | /' "$CASE_LOG" | tail -n 40
        echo "    | --- dmesg tail ---"
        dmesg | tail -n 15 | sed 's/^/    | /'
        for log in /run/userblk/*.log /tmp/userblk-*/*.log; do
            [ -s "$log" ] || continue
            echo "    | --- $log (tail) ---"
            tail -n 15 "$log" | sed 's/^/    | /'
        done
        cleanup_devices
    fi
}

# Skip the current case with a reason (exit code 77 inside case_run).
skip() { echo "$*"; exit 77; }

die() { echo "ASSERTION FAILED: $*" >&2; return 1; }

# Assert that a command fails and that its stderr mentions a phrase.
expect_fail() {
    local phrase=$1; shift
    local out rc=0
    out=$("$@" 2>&1) || rc=$?
    echo "\$ $* -> exit $rc: $out"
    [ "$rc" -ne 0 ] || die "expected failure from: $*"
    [ "$rc" -lt 128 ] || die "crashed with signal $((rc - 128)): $*"
    grep -qi -- "$phrase" <<<"$out" || die "error for '$*' does not mention '$phrase': $out"
    case "$out" in *panicked*|*RUST_BACKTRACE*) die "panic: $out" ;; esac
}

# Device id from `add` output (first line: "dev id N: ...").
dev_id_of() { sed -n 's/^dev id \([0-9]*\):.*/\1/p' <<<"$1" | head -n 1; }

# Field from the second `list` line: 7 = pid, 11 = state.
list_word() {
    ub list -n "$1" | sed -n 2p | awk -v w="$2" '{print $w}'
}

wait_for() { # wait_for SECONDS COMMAND...
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# Whether process PID has FILE open as its stdin (`sleep 60 <FILE &` has
# opened it only once the background shell got that far).
has_stdin() { [ "$(readlink "/proc/$1/fd/0" 2>/dev/null)" = "$2" ]; }

# Fail unless nothing holds block device DEV exclusively: a file system
# still alive on it (mounted anywhere, in any namespace) makes O_EXCL fail.
not_held() { # not_held DEV WHAT
    python3 -c 'import os,sys; os.close(os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL))' "$1" 2>/dev/null \
        || die "$2: $1 is still held (a file system on it is still mounted somewhere)"
}

# `add` a device, check it is live, and print its id.
add_dev() {
    local out id
    out=$(ub add "$@") || { echo "$out"; return 1; }
    echo "$out" >&2
    id=$(dev_id_of "$out")
    [ -n "$id" ] || die "no id in add output"
    [ -b "/dev/ublkb$id" ] || die "/dev/ublkb$id missing after add"
    [ "$(list_word "$id" 11)" = LIVE ] || die "device $id not LIVE"
    echo "$id"
}

# Whether process PID has exited: gone, or a zombie (a daemon's parent is
# init, which may reap it a moment after `del` has seen it exit).
exited() { ! kill -0 "$1" 2>/dev/null || grep -q '^State:.*[ZX]' "/proc/$1/status" 2>/dev/null; }

# Delete a device and check everything is gone.
del_dev() {
    local id=$1 pid
    pid=$(list_word "$id" 7)
    ub del -n "$id"
    wait_for 10 test ! -e "/dev/ublkb$id" || die "/dev/ublkb$id still exists"
    wait_for 10 test ! -e "/dev/ublkc$id" || die "/dev/ublkc$id still exists"
    wait_for 10 exited "$pid" || die "daemon $pid still running"
    [ ! -e "/run/userblk/$id.json" ] || die "state file left behind"
}

# Delete every device of state directory DIR (default $USERBLK_STATE_DIR):
# a host suite's own devices, never anyone else's (no `del -a` there).
del_own_devices() { # del_own_devices [DIR]
    local f dir=${1:-$USERBLK_STATE_DIR}
    for f in "$dir"/*.json; do
        [ -e "$f" ] || continue
        case "$f" in */stats-*) continue ;; esac
        ub del -n "$(basename "$f" .json)" >/dev/null 2>&1 || true
    done
}

# ---- for the host suites (tests/host/, on this machine) -------------------------

# The binary under test must exist: without it the suite cannot start.
need_userblk() {
    [ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
}

# Start a host suite NAME: WORK is a new private directory, and the state
# directory in it holds this suite's devices only (deleted by id).
host_suite() { # host_suite NAME
    need_userblk
    WORK=$(mktemp -d "/var/tmp/userblk-$1.XXXXXX")
    export USERBLK_STATE_DIR=$WORK/state
}

# Run the calling host suite again in a private mount namespace with a
# tmpfs on /dev/userblk, so the name links it makes are its own; returns
# (inside that namespace) only in the second run. MARK names the variable
# that says "inside"; TAG names the tmpfs. Call at the top of the suite:
#   private_name_links NAMES_PRIVATE userblk-names "$0" "$@"
private_name_links() { # private_name_links MARK TAG SCRIPT [ARGS...]
    local mark=$1 tag=$2 links=/dev/userblk made rc=0
    shift 2
    if [ -z "${!mark:-}" ]; then
        [ "$(id -u)" = 0 ] || { plan 1; case_run root_needed skip "needs root"; summary; exit; }
        made=
        [ -d "$links" ] || { mkdir "$links" && made=1; }
        env "$mark=1" unshare -m --propagation private bash "$@" || rc=$?
        # The empty directory made only to mount on.
        [ -z "$made" ] || rmdir "$links" 2>/dev/null || true
        exit "$rc"
    fi
    mount -t tmpfs -o mode=0755 "$tag" "$links" || { echo "cannot mount a tmpfs on $links"; exit 2; }
}

# Skip the case unless every TOOL is installed.
needs() { local t; for t in "$@"; do command -v "$t" >/dev/null || skip "$t is not installed"; done; }

# `add` a device whose frontend names what it serves ("frontend F block
# PATH": a FUSE file, a loop device or an NBD URI); print "ID PATH".
add_served() {
    local out id path
    out=$(ub add "$@") || { echo "$out" >&2; return 1; }
    echo "$out" >&2
    id=$(dev_id_of "$out")
    [ -n "$id" ] || die "no id in add output"
    path=$(sed -n 's/.*frontend [a-z]* block \([^ ]*\).*/\1/p' <<<"$out")
    [ -n "$path" ] || die "add did not print what it serves: $out"
    [ "$(list_word "$id" 11)" = LIVE ] || die "device $id not LIVE"
    echo "$id $path"
}

# Delete a device served without ublk and check its daemon and state file
# are gone (state in $USERBLK_STATE_DIR, /run/userblk by default).
del_served() { # del_served ID
    local id=$1 pid
    pid=$(list_word "$id" 7)
    ub del -n "$id"
    wait_for 5 exited "$pid" || die "daemon $pid still running"
    [ ! -e "${USERBLK_STATE_DIR:-/run/userblk}/$id.json" ] || die "state file left behind"
}

# ---- for the churn suites (tests/host/churn.sh, vm/suite/churn.sh) --------------

# counts PID: "FDS THREADS". io_uring's workers (iou-wrk-*) are left out:
# the kernel starts them on demand and ends them when idle; so are rings,
# which a FUSE serving thread makes at its first request.
counts() {
    local threads fds
    threads=$(cat "/proc/$1"/task/*/comm 2>/dev/null | grep -vc '^iou-' || true)
    fds=$(find "/proc/$1/fd" -mindepth 1 -maxdepth 1 -printf '%l\n' 2>/dev/null | grep -vc 'io_uring' || true)
    echo "$fds $threads"
}

# Resident memory of PID in KiB, and how much of it is transparent huge pages.
rss_kib() { awk '$1 == "VmRSS:" {print $2}' "/proc/$1/status"; }
huge_kib() { awk '$1 == "AnonHugePages:" {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null; }

# An idle daemon's RSS must stay where it was (BEFORE, KiB) while other
# devices come and go; the slack covers the kernel's per-CPU counting of
# RSS and a late udev probe, not a huge page. (Request buffers first
# touched by a read once grew it by 2 MiB steps long after `add`, as
# khugepaged collapsed their 4 KiB pages into huge pages.)
IDLE_RSS_SLACK_KIB=1536
idle_rss_kept() { # idle_rss_kept PID BEFORE
    local now
    now=$(rss_kib "$1")
    [ -n "$now" ] && [ "$now" -le $(( $2 + IDLE_RSS_SLACK_KIB )) ] \
        || die "idle daemon $1: RSS $2 KiB before, ${now:-?} KiB after (more than ${IDLE_RSS_SLACK_KIB} KiB over; huge pages now $(huge_kib "$1") KiB)"
}

# counts PID once two looks 0.3 s apart agree.
settled_counts() {
    local a b i
    b=$(counts "$1")
    for (( i = 0; i < 20; i++ )); do
        a=$b; sleep 0.3; b=$(counts "$1")
        [ "$a" != "$b" ] || break
    done
    echo "$b"
}

# CYCLES cycles of the suite's `cycle CASE N ARGS...` (add, check, del).
churn_cycles() { # churn_cycles CASE ARGS...
    local i start=$SECONDS
    for (( i = 1; i <= CYCLES; i++ )); do
        echo "cycle $i of $CYCLES"
        cycle "$1" "$i" "${@:2}"
    done
    echo "note: $CYCLES cycles in $(( SECONDS - start ))s; daemon fds/threads $(cat "$FIRST.$1")"
}

# The first and the last cycle's daemons (cycle N of CYCLES), once settled
# (serving threads open their descriptors as they start), must have as
# many fds and threads; the first's are kept in FIRST.CASE.
same_counts_as_first() { # same_counts_as_first CASE N PID
    local now
    if [ "$2" = 1 ]; then
        settled_counts "$3" >"$FIRST.$1"
    elif [ "$2" = "$CYCLES" ]; then
        now=$(settled_counts "$3")
        [ "$now" = "$(cat "$FIRST.$1")" ] || die "daemon $3 of the last cycle has fds/threads $now, the first cycle's had $(cat "$FIRST.$1")"
    fi
}

# A descriptor open in `add`'s caller (not close-on-exec) must not reach
# the daemon, which would hold it for its whole life. STATE: the state
# directory the daemon records its pid in.
inherits_nothing() { # inherits_nothing ADD-ARGS...
    local out id pid held
    out=$(ub add "$@" 2>&1 9>"$WORK/held") || { echo "$out"; die "add failed"; }
    id=$(dev_id_of "$out")
    pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$STATE/$id.json" | head -n 1)
    [ -n "$pid" ] || die "no pid for device $id"
    held=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 -lname "$WORK/held" 2>/dev/null)
    # (A udev probe of the new device may hold it for a moment.)
    wait_for 10 ub del -n "$id" || die "del -n $id failed"
    [ -z "$held" ] || die "daemon $pid holds its caller's descriptor: $held"
}

# ---- for the resize suites (tests/host/resize.sh, vm/suite/resize.sh) ------------

# Whether this process may resize a mounted ext4 (CAP_SYS_RESOURCE, bit 24).
has_sys_resource() { (( 0x$(awk '/^CapEff/ {print $2}' /proc/self/status) >> 24 & 1 )); }

# ext4 on block device BLK of device ID, mounted on MNT, grown from 64M to
# 192M with `userblk resize` and resize2fs while mounted (offline, said in a
# note, where CAP_SYS_RESOURCE is withheld), then checked clean; the data
# written before the resize intact, and the new space usable.
grow_ext4() { # grow_ext4 ID BLK MNT
    local id=$1 blk=$2 mnt=$3 sum before after m=$((1 << 20))
    [ "$(blockdev --getsize64 "$blk")" = $((64 * m)) ] || die "not 64M before"
    mkfs.ext4 -q -F "$blk"
    mount "$blk" "$mnt"
    dd if=/dev/urandom of="$mnt/blob" bs=1M count=16 status=none
    sum=$(sha256sum <"$mnt/blob")
    before=$(df -k --output=size "$mnt" | tail -n 1 | tr -d ' ')
    ub resize -n "$id" --size 192M
    [ "$(blockdev --getsize64 "$blk")" = $((192 * m)) ] || die "blockdev --getsize64 says $(blockdev --getsize64 "$blk")"
    ub list -n "$id" --json | python3 -c 'import json,sys; assert json.load(sys.stdin)[0]["target"]["size"] == 192 << 20' \
        || die "list does not show the new size"
    if has_sys_resource; then
        resize2fs "$blk"
    else
        echo "note: no CAP_SYS_RESOURCE here: resize2fs ran offline"
        umount "$mnt"
        e2fsck -f -y "$blk" >/dev/null
        resize2fs "$blk"
        mount "$blk" "$mnt"
    fi
    after=$(df -k --output=size "$mnt" | tail -n 1 | tr -d ' ')
    echo "note: df $before KiB -> $after KiB"
    [ "$after" -gt $((before * 2)) ] || die "the file system did not grow ($before -> $after KiB)"
    dd if=/dev/urandom of="$mnt/tail" bs=1M count=100 status=none
    sync
    [ "$(sha256sum <"$mnt/blob")" = "$sum" ] || die "data written before the resize changed"
    umount "$mnt"
    fsck.ext4 -n -f "$blk"
}

# After a failed case: unmount first, then force (del refuses held devices).
cleanup_devices() {
    umount /mnt/ub* 2>/dev/null || true
    ub del -a --force >/dev/null 2>&1 || true
}

summary() {
    rm -f "$CASE_LOG"
    echo
    [ "${#FAILED_NAMES[@]}" -eq 0 ] || printf 'failed: %s\n' "${FAILED_NAMES[@]}"
    local ran=$((PASSED + FAILED + SKIPPED)) short=0
    if [ -z "$PLANNED" ]; then
        echo "the suite declares no plan (plan N before its cases)"
        short=1
    elif [ -n "${ONLY:-}" ]; then
        echo "ONLY=$ONLY: $ran of the $PLANNED cases ran"
    elif [ "$ran" -lt "$PLANNED" ]; then
        echo "only $ran of the $PLANNED cases this suite defines ran"
        short=1
    fi
    echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
    [ "$FAILED" -eq 0 ] && [ "$short" -eq 0 ]
}

# Skip the case when this machine lacks $FRONTEND (fuse: FUSE and loop
# devices; ublk: ublk_drv), for suites that run on either (tests/s3, tests/host/rbd.sh).
have_frontend() {
    if [ "$FRONTEND" = fuse ]; then
        [ -e /dev/fuse ] && [ -e /dev/loop-control ] || skip "no FUSE or no loop devices"
    else
        [ -e /dev/ublk-control ] || modprobe ublk_drv 2>/dev/null || true
        [ -e /dev/ublk-control ] || skip "no ublk in this kernel"
    fi
}
