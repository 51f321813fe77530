#!/usr/bin/env bash
# Guest side of bench/memory.sh: runs inside the VM (vm/run.sh), as root,
# from the repository root. Measures the daemon's memory per device: idle,
# and after fio has used every tag with the largest requests (so every
# request buffer has been touched), for userblk null/mem/file and rublk
# null, at depth 128 and 512 KiB buffers, 1 and 2 queues.
#
#   bash bench/guest/memory.sh OUT
#
# USERBLK overrides the binary (default: this checkout's release build),
# RUBLK the baseline (default: /opt/rublk/bin/rublk; skipped if missing).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(( $# == 1 )) || die "usage: $0 OUT"
OUT=$1
cd "$(dirname "$0")/../.."
guest_userblk
: "${RUBLK:=/opt/rublk/bin/rublk}"
mkdir -p "$OUT"

WORK=/run/userblk-memory-bench
guest_private_userblk "$WORK"
export USERBLK_STATE_DIR=$WORK/state
modprobe ublk_drv

cleanup() {
    "$USERBLK" del -a >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# status_kib PID FIELD: a VmXxx/RssXxx field of /proc/PID/status, in KiB.
status_kib() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; }

# Every tag of every queue busy with a 512 KiB request, reads and writes.
touch_all() { # touch_all DEV QUEUES
    fio --name=touch --filename="$1" --ioengine=io_uring --direct=1 --rw=randrw \
        --bs=512k --iodepth=128 --numjobs="$2" --size=64M --io_size=256M \
        --group_reporting --output-format=terse >/dev/null
}

row() { # row LABEL PID
    printf '%-28s %8s %8s %8s %8s %8s %8s\n' "$1" \
        "$(status_kib "$2" VmRSS)" "$(status_kib "$2" VmHWM)" "$(status_kib "$2" VmLck)" \
        "$(status_kib "$2" RssAnon)" "$(status_kib "$2" RssFile)" "$(status_kib "$2" RssShmem)"
}

truncate -s 64M "$WORK/file.img"
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); kernel $(uname -r); cpus $(nproc)"
    echo "userblk: $("$USERBLK" --version); depth 128, 512 KiB buffers (the defaults)"
    echo "KiB per daemon; 'idle' = just added, 'busy' = after fio used every tag with 512 KiB requests"
    echo "RssShmem is mem's data (a memfd), not overhead"
    echo
    printf '%-28s %8s %8s %8s %8s %8s %8s\n' device VmRSS VmHWM VmLck RssAnon RssFile RssShmem
} >"$OUT/summary.txt"

measure() { # measure LABEL QUEUES PID DEV
    row "$1 q$2 idle" "$3" >>"$OUT/summary.txt"
    touch_all "$4" "$2"
    row "$1 q$2 busy" "$3" >>"$OUT/summary.txt"
}

for q in 1 2; do
    for t in null mem file; do
        case $t in
            null) args=(null --size 64M) ;;
            mem) args=(mem --size 64M) ;;
            file) args=(file -f "$WORK/file.img") ;;
        esac
        out=$("$USERBLK" add "${args[@]}" -q "$q" -d 128)
        id=$(sed -n '1s/^dev id \([0-9]*\):.*/\1/p' <<<"$out")
        pid=$("$USERBLK" list -n "$id" | sed -n 2p | awk '{print $7}')
        measure "userblk $t" "$q" "$pid" "/dev/ublkb$id"
        "$USERBLK" del -n "$id"
    done
    if [[ -x $RUBLK ]]; then
        out=$("$RUBLK" add null -q "$q" -d 128 2>&1)
        id=$(sed -n 's/^dev id \([0-9]*\):.*/\1/p' <<<"$out" | head -n1)
        # `userblk list` shows the kernel's view of any ublk device.
        pid=$([[ -n $id ]] && "$USERBLK" list -n "$id" | sed -n 2p | awk '{print $7}' || true)
        if [[ -n $id && -n $pid ]]; then
            measure "rublk null" "$q" "$pid" "/dev/ublkb$id"
        else
            echo "rublk null q$q: could not find its device or pid: $out" >>"$OUT/summary.txt"
        fi
        [[ -n $id ]] && "$RUBLK" del -n "$id" >/dev/null 2>&1 || true
    fi
done
cat "$OUT/summary.txt"
