#!/usr/bin/env bash
# Real-kernel suite for batch I/O (UBLK_F_BATCH_IO, Linux 7.0): the batch
# queue driver under fio verify, ext4, del under load, kill -9 and recover,
# with each copy mode; on a kernel without it, `--io-mode batch` warns once
# and the device works per-tag. Runs inside the VM (vm/run.sh), as root.
# Usage: bash vm/suite/batch.sh   (from the repository root; USERBLK overrides the binary)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
[ -e /dev/ublk-control ] || modprobe ublk_drv || true

WORK=/run/batch-suite
mkdir -p "$WORK" /mnt
FIO=(fio --ioengine=io_uring --direct=1 --output-format=terse --minimal)
BATCH_IO=$((1 << 15))
AUTO_BUF_REG=$((1 << 11))
USER_COPY=$((1 << 7))

backing() { # backing NAME SIZE: a fresh sparse file in tmpfs
    rm -f "$WORK/$1"
    truncate -s "$2" "$WORK/$1"
    echo "$WORK/$1"
}

dev_flags() { ub list -n "$1" --json | sed -n 's/^ *"flags": *\([0-9]*\),\{0,1\}$/\1/p' | head -n 1; }
io_mode() { ub list -n "$1" | sed -n 's/^\tio mode \(.*\)$/\1/p'; }
state_is() { [ "$(list_word "$1" 11)" = "$2" ]; }

is_batch() { # is_batch ID: the kernel granted BATCH_IO and list says so
    local flags
    flags=$(dev_flags "$1")
    [ -n "$flags" ] && [ $((flags & BATCH_IO)) -ne 0 ] || die "device $1: flags ${flags:-?} lack BATCH_IO"
    [ "$(io_mode "$1")" = batch ] || die "device $1: list says io mode '$(io_mode "$1")', not batch"
}

# fio writes and verifies the whole device (verify_backlog checks while
# writing), with one fio job per queue on its own half when QUEUES is 2.
verify() { # verify DEV QUEUES
    local dev=$1 queues=$2 size
    size=$(($(blockdev --getsize64 "$dev") / queues))
    "${FIO[@]}" --name=verify --filename="$dev" --rw=randwrite --bsrange=4k-128k --iodepth=32 \
        --numjobs="$queues" --size="$size" --offset_increment="$size" --verify=crc32c \
        --verify_backlog=64 --verify_fatal=1 --do_verify=1 --randrepeat=0
}

target_verify() { # target_verify QUEUES ADD-ARGS...
    local queues=$1 id; shift
    id=$(add_dev --io-mode batch -q "$queues" "$@")
    is_batch "$id"
    [ "$(ub list -n "$id" | grep -c 'queue [0-9]*: tid')" = "$queues" ] || die "not $queues queue threads"
    verify "/dev/ublkb$id" "$queues"
    del_dev "$id"
}

null_io() { # null_io QUEUES: every request completes, reads are zeroes
    local id
    id=$(add_dev --io-mode batch -q "$1" null --size 1G)
    is_batch "$id"
    dd if=/dev/urandom of="/dev/ublkb$id" bs=1M count=4 oflag=direct status=none
    cmp -n 4194304 "/dev/ublkb$id" /dev/zero || die "null read non-zero data"
    "${FIO[@]}" --name=null --filename="/dev/ublkb$id" --rw=randrw --bsrange=4k-128k --iodepth=64 \
        --numjobs="$1" --io_size=64M
    del_dev "$id"
}

fs_cycle() { # ext4 mkfs, files, umount, fsck clean, remount, data intact
    local id mnt=/mnt/ub-batch sum
    id=$(add_dev --io-mode batch -q 2 mem --size 128M)
    is_batch "$id"
    mkdir -p "$mnt"
    mkfs.ext4 -q -F "/dev/ublkb$id"
    mount "/dev/ublkb$id" "$mnt"
    dd if=/dev/urandom of="$mnt/blob" bs=1M count=16 status=none
    for i in $(seq 1 50); do echo "file $i" >"$mnt/f$i"; done
    sum=$(sha256sum <"$mnt/blob")
    umount "$mnt"
    fsck.ext4 -n -f "/dev/ublkb$id"
    mount "/dev/ublkb$id" "$mnt"
    [ "$(sha256sum <"$mnt/blob")" = "$sum" ] || die "blob changed across umount/mount"
    [ "$(cat "$mnt/f37")" = "file 37" ] || die "small file lost"
    umount "$mnt"
    del_dev "$id"
}

del_under_load() { # del while fio runs: refused, --force stops it, fio gets errors, nothing hangs
    local id pid rc=0
    id=$(add_dev --io-mode batch -q 2 file -f "$(backing load.img 128M)")
    is_batch "$id"
    fio --ioengine=io_uring --direct=1 --name=load --filename="/dev/ublkb$id" --rw=randrw --bs=4k \
        --iodepth=64 --numjobs=2 --time_based --runtime=120 >"$WORK/load.out" 2>&1 &
    pid=$!
    sleep 3
    kill -0 $pid || die "fio did not start"
    # Safe stop: plain del refuses a device fio has open; --force stops it.
    ! timeout 60 "$USERBLK" del -n "$id" 2>"$WORK/del.err" || die "del of a device fio has open did not refuse"
    grep -q "open by pid" "$WORK/del.err" || die "the refusal names no holder: $(cat "$WORK/del.err")"
    timeout 60 "$USERBLK" del -n "$id" --force || die "del --force under load failed or hung"
    timeout 60 sh -c "while kill -0 $pid 2>/dev/null; do sleep 0.2; done" || die "fio hung after del"
    wait $pid || rc=$?
    [ "$rc" -ne 0 ] || die "fio reported success after its device vanished"
    [ ! -e "/dev/ublkb$id" ] || die "device still present"
}

kill_and_recover() { # kill -9 under fio verify, recover: the new daemon serves batch
    local id pid fiopid rc=0
    id=$(add_dev --io-mode batch --reissue mem --size 64M)
    is_batch "$id"
    fio --ioengine=io_uring --direct=1 --name=recover --filename="/dev/ublkb$id" --rw=randwrite \
        --bs=4k --iodepth=16 --size=100% --time_based --runtime=40 --verify=crc32c \
        --verify_backlog=64 --verify_fatal=1 --verify_state_save=0 --randrepeat=0 \
        >"$WORK/recover.out" 2>&1 &
    fiopid=$!
    sleep 3
    pid=$(list_word "$id" 7)
    kill -KILL "$pid"
    wait_for 30 state_is "$id" QUIESCED || die "not QUIESCED after kill -9 (state $(list_word "$id" 11))"
    ub recover -n "$id" >/dev/null
    wait_for 10 state_is "$id" LIVE || die "not LIVE after recover"
    [ "$(list_word "$id" 7)" != "$pid" ] || die "pid did not change"
    is_batch "$id"
    wait "$fiopid" || rc=$?
    [ "$rc" = 0 ] || { cat "$WORK/recover.out"; die "fio failed across the recovery (exit $rc)"; }
    verify "/dev/ublkb$id" 1
    del_dev "$id"
}

zero_copy_batch() { # file under zero copy (AUTO_BUF_REG) with batch commands
    local id flags
    id=$(add_dev --io-mode batch --zero-copy file -f "$(backing zc.img 64M)")
    is_batch "$id"
    flags=$(dev_flags "$id")
    [ $((flags & AUTO_BUF_REG)) -ne 0 ] || die "flags $flags lack AUTO_BUF_REG"
    verify "/dev/ublkb$id" 1
    del_dev "$id"
}

user_copy_batch() {
    local id flags
    id=$(add_dev --io-mode batch --user-copy -q 2 mem --size 64M)
    is_batch "$id"
    flags=$(dev_flags "$id")
    [ $((flags & USER_COPY)) -ne 0 ] || die "flags $flags lack USER_COPY"
    verify "/dev/ublkb$id" 2
    del_dev "$id"
}

auto_and_per_tag() { # per-tag on request; auto: per-tag for now (AUTO_PREFERS_BATCH in ublk/io_mode.rs), quietly
    local id out want=per-tag
    id=$(add_dev --io-mode per-tag mem --size 16M)
    [ "$(io_mode "$id")" = per-tag ] || die "--io-mode per-tag gave '$(io_mode "$id")'"
    verify "/dev/ublkb$id" 1
    del_dev "$id"
    out=$(ub add mem --size 16M 2>&1) || { echo "$out"; die "add failed"; }
    id=$(dev_id_of "$out")
    ! grep -qi 'batch I/O' <<<"$out" || die "auto is not quiet: $out"
    [ "$(io_mode "$id")" = "$want" ] || die "auto gave '$(io_mode "$id")', not $want"
    echo "note: auto serves $want on $(uname -r)"
    del_dev "$id"
}

# A kernel without BATCH_IO: one warning line, then a working per-tag device.
fallback() {
    local out id warns
    out=$(ub add --io-mode batch mem --size 64M 2>&1) || { echo "$out"; die "add failed"; }
    echo "$out"
    id=$(dev_id_of "$out")
    warns=$(grep -ci 'batch I/O' <<<"$out" || true)
    [ "$warns" = 1 ] || die "expected one batch I/O warning, got $warns"
    grep -qi 'lacks it' <<<"$out" || die "the warning does not say why"
    [ "$(io_mode "$id")" = per-tag ] || die "list says '$(io_mode "$id")', not per-tag"
    verify "/dev/ublkb$id" 1
    del_dev "$id"
}

no_panics_logged() {
    ! grep -l 'panicked' /run/userblk/*.log 2>/dev/null || die "a daemon panicked"
}

# ---- run ---------------------------------------------------------------------

echo "kernel $(uname -r); userblk $("$USERBLK" --version)"
cleanup_devices
BATCH_CASES=(
    "null -q 1: fio, zero reads|null_io 1"
    "null -q 2: fio, zero reads|null_io 2"
    "mem -q 1: fio verify|target_verify 1 mem --size 64M"
    "mem -q 2: fio verify|target_verify 2 mem --size 64M"
    "file -q 1: fio verify|target_verify 1 file -f $(backing b1.img 64M) --no-zero-copy"
    "file -q 2: fio verify|target_verify 2 file -f $(backing b2.img 64M) --no-zero-copy"
    "mem -q 2: ext4 mkfs/mount/fsck/remount|fs_cycle"
    "file -q 2: del under fio, fio errors, no hang|del_under_load"
    "mem --reissue: kill -9 under fio verify, recover, still batch|kill_and_recover"
    "file --zero-copy: AUTO_BUF_REG with batch, fio verify|zero_copy_batch"
    "mem --user-copy -q 2: fio verify|user_copy_batch"
)
plan $((${#BATCH_CASES[@]} + 3))
if ub features | grep -q BATCH_IO; then
    for c in "${BATCH_CASES[@]}"; do
        # shellcheck disable=SC2086 # the command's words split on purpose
        case_run "batch: ${c%%|*}" ${c#*|}
    done
    case_run "fallback: --io-mode batch on a kernel without it" skip "this kernel has BATCH_IO"
else
    for c in "${BATCH_CASES[@]}"; do
        case_run "batch: ${c%%|*}" skip "this kernel lacks BATCH_IO (Linux 7.0+)"
    done
    case_run "fallback: --io-mode batch on a kernel without it" fallback
fi
case_run "--io-mode per-tag, and auto" auto_and_per_tag
case_run "no daemon panicked" no_panics_logged
cleanup_devices
summary
