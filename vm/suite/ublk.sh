#!/usr/bin/env bash
# Real-kernel suite for the ublk core: runs inside the VM (vm/run.sh), as root.
# Usage: bash vm/suite/ublk.sh   (from the repository root; USERBLK overrides the binary)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
[ -e /dev/ublk-control ] || modprobe ublk_drv || true

# /run is a plain tmpfs in the VM (/tmp is an overlay).
WORK=/run/ublk-suite
mkdir -p "$WORK" /mnt
FIO=(fio --ioengine=io_uring --direct=1 --output-format=terse --minimal)

# A fresh sparse backing file of SIZE in tmpfs.
backing() { # backing NAME SIZE
    rm -f "$WORK/$1"
    truncate -s "$2" "$WORK/$1"
    echo "$WORK/$1"
}

# ---- per-target checks ------------------------------------------------------

fio_verify() { # whole device, random writes then verification reads
    local dev=$1
    "${FIO[@]}" --name=verify --filename="$dev" --rw=randwrite --bsrange=4k-128k --iodepth=16 \
        --size=100% --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0
    "${FIO[@]}" --name=randrw --filename="$dev" --rw=randrw --bs=4k --iodepth=32 --size=100% \
        --io_size=8M --verify=crc32c --verify_fatal=1
}

fs_cycle() { # ext4 across umount/mount, fsck clean
    local dev=$1 mnt=/mnt/ub-fs
    mkdir -p "$mnt"
    mkfs.ext4 -q -F "$dev"
    mount "$dev" "$mnt"
    dd if=/dev/urandom of="$mnt/blob" bs=1M count=8 status=none
    mkdir -p "$mnt/dir"
    for i in $(seq 1 50); do echo "file $i" >"$mnt/dir/f$i"; done
    local sum
    sum=$(sha256sum <"$mnt/blob")
    umount "$mnt"
    fsck.ext4 -n -f "$dev"
    mount "$dev" "$mnt"
    [ "$(sha256sum <"$mnt/blob")" = "$sum" ] || die "blob changed across umount/mount"
    [ "$(cat "$mnt/dir/f37")" = "file 37" ] || die "small file lost"
    umount "$mnt"
}

discard_zeroes() { # discard and write-zeroes read back as zeroes
    local dev=$1
    dd if=/dev/urandom of="$dev" bs=1M count=4 oflag=direct status=none
    blkdiscard -o 0 -l 1M "$dev"
    cmp -n 1048576 "$dev" /dev/zero || die "discarded range does not read as zeroes"
    cmp -i 1048576 -n 1048576 "$dev" /dev/urandom >/dev/null 2>&1 && die "impossible"
    ! cmp -s -i 1048576:0 -n 4096 "$dev" /dev/zero || die "data after the discarded range was lost"
    blkdiscard -z -o 1M -l 1M "$dev"
    cmp -i 1048576:0 -n 1048576 "$dev" /dev/zero || die "write-zeroes range does not read as zeroes"
}

fsync_heavy() {
    local dev=$1
    "${FIO[@]}" --name=fsync --filename="$dev" --rw=randwrite --bs=4k --iodepth=1 --size=100% \
        --io_size=2M --fsync=1
}

check_queue_attrs() { # check_queue_attrs ID CACHE(write back|write through) DISCARD(yes|no)
    local q=/sys/block/ublkb$1/queue
    [ "$(cat $q/write_cache)" = "$2" ] || die "write_cache is '$(cat $q/write_cache)', expected '$2'"
    if [ "$2" = "write back" ]; then
        [ "$(cat $q/fua)" = 1 ] || die "FUA not advertised"
    fi
    local dmax
    dmax=$(cat $q/discard_max_bytes)
    if [ "$3" = yes ]; then [ "$dmax" -gt 0 ] || die "discard not advertised"; else [ "$dmax" = 0 ] || die "discard advertised"; fi
}

target_cases() { # target_cases LABEL CACHE DISCARD FS ADD-ARGS...
    local label=$1 cache=$2 discard=$3 fs=$4; shift 4
    local id
    if [ -n "${ONLY:-}" ] && ! grep -qE -- "$ONLY" <<<"$label"; then return 0; fi
    id=$(add_dev "$@" 2>/dev/null) || { case_run "$label: add" add_dev "$@"; return; }
    PASSED=$((PASSED + 1)); printf 'PASS %-48s\n' "$label: add, LIVE in list"
    local dev=/dev/ublkb$id
    case_run "$label: queue limits advertised" check_queue_attrs "$id" "$cache" "$discard"
    case_run "$label: fio verify whole device" fio_verify "$dev"
    case_run "$label: fsync-heavy fio" fsync_heavy "$dev"
    if [ "$discard" = yes ]; then
        case_run "$label: discard/write-zeroes read as zeroes" discard_zeroes "$dev"
    fi
    if [ "$fs" = yes ]; then
        case_run "$label: ext4 mkfs/mount/fsck/remount" fs_cycle "$dev"
    fi
    case_run "$label: del removes device, daemon, state" del_dev "$id"
}

null_io() { # null: I/O completes and reads return zeroes
    local dev=$1
    dd if=/dev/urandom of="$dev" bs=1M count=4 oflag=direct status=none
    cmp -n 4194304 "$dev" /dev/zero || die "null device read non-zero data"
    "${FIO[@]}" --name=null --filename="$dev" --rw=randrw --bs=4k --iodepth=32 --io_size=16M
}

# ---- cases -------------------------------------------------------------------

main_job() { # the README's promise: mem 1G holds ext4 across umount/mount
    local out id
    out=$(ub add mem --size 1G)
    echo "$out"
    id=$(dev_id_of "$out")
    [ "$id" = 0 ] || die "expected /dev/ublkb0 on a machine with no devices, got $id"
    grep -q "frontend ublk block /dev/ublkb0" <<<"$out" || die "--frontend auto did not pick ublk"
    [ "$(cat /sys/block/ublkb0/size)" = 2097152 ] || die "wrong capacity"
    fs_cycle /dev/ublkb0
    del_dev 0
}

fuse_beside_ublk() { # explicit FUSE on a ublk kernel; ids never collide
    [ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
    [ -e /dev/fuse ] || skip "no FUSE in this kernel"
    local out f u
    out=$(ub add mem --size 16M --frontend fuse --loop)
    echo "$out"
    f=$(dev_id_of "$out")
    grep -q "frontend fuse block /dev/loop" <<<"$out" || die "no loop device for the FUSE device"
    out=$(ub add mem --size 16M)
    echo "$out"
    u=$(dev_id_of "$out")
    grep -q "frontend ublk block /dev/ublkb$u" <<<"$out" || die "auto did not pick ublk"
    [ "$f" != "$u" ] || die "FUSE device and ublk device share id $u"
    ub list | grep -q "^dev id $f: frontend fuse" || die "list misses the FUSE device"
    ub list | grep -q "^dev id $u: nr_hw_queues" || die "list misses the ublk device"
    ub del -n "$f"
    ! grep -qE '^userblk [^ ]+ fuse(\.userblk)? ' /proc/self/mounts || die "FUSE mount left"
    del_dev "$u"
}

features_case() {
    ub features | tee /dev/stderr | grep -q CMD_IOCTL_ENCODE
    ub features --json | grep -q '"features"'
}

null_cases() {
    local id
    id=$(add_dev null)
    [ "$(cat /sys/block/ublkb$id/size)" = $((250 * 1024 * 1024 * 2)) ] || die "null default size is not 250G"
    check_queue_attrs "$id" "write through" yes
    null_io "/dev/ublkb$id"
    del_dev "$id"
}

two_devices() {
    local a b f
    f=$(backing two.img 64M)
    a=$(add_dev mem --size 64M)
    b=$(add_dev file -f "$f")
    [ "$a" != "$b" ] || die "same id twice"
    fio_verify "/dev/ublkb$a" & local p1=$!
    fio_verify "/dev/ublkb$b" & local p2=$!
    wait $p1 || die "fio on device $a failed"
    wait $p2 || die "fio on device $b failed"
    del_dev "$a"; del_dev "$b"
}

two_queues() {
    local id
    id=$(add_dev -q 2 mem --size 64M)
    [ "$(ub list -n "$id" | head -1 | awk '{print $5}')" = 2 ] || die "nr_hw_queues is not 2"
    [ "$(ub list -n "$id" | grep -c 'queue [01]: tid')" = 2 ] || die "list does not show 2 queue threads"
    "${FIO[@]}" --name=q2 --filename="/dev/ublkb$id" --rw=randwrite --bs=4k --iodepth=16 --numjobs=2 \
        --size=32M --offset_increment=32M --verify=crc32c --verify_fatal=1
    del_dev "$id"
}

del_under_load() {
    local id f pid rc=0
    f=$(backing load.img 128M)
    id=$(add_dev file -f "$f")
    fio --ioengine=io_uring --direct=1 --name=load --filename="/dev/ublkb$id" --rw=randrw --bs=4k \
        --iodepth=32 --time_based --runtime=120 >"$WORK/load.out" 2>&1 &
    pid=$!
    sleep 3
    kill -0 $pid || die "fio did not start"
    # fio has the device open: plain del refuses naming it, --force stops it.
    expect_fail "open by pid" timeout 60 "$USERBLK" del -n "$id"
    timeout 60 "$USERBLK" del -n "$id" --force || die "del --force under load failed or hung"
    # fio must see errors and end, not hang.
    timeout 60 sh -c "while kill -0 $pid 2>/dev/null; do sleep 0.2; done" || die "fio hung after del"
    wait $pid || rc=$?
    [ "$rc" -ne 0 ] || die "fio reported success after its device vanished"
    [ ! -e "/dev/ublkb$id" ] || die "device still present"
}

sigterm_stops() {
    local id pid
    id=$(add_dev mem --size 16M)
    pid=$(list_word "$id" 7)
    kill -TERM "$pid"
    wait_for 20 test ! -e "/dev/ublkc$id" || die "SIGTERM did not delete the device"
    wait_for 10 sh -c "! kill -0 $pid 2>/dev/null" || die "daemon did not exit"
    [ ! -e "/run/userblk/$id.json" ] || die "state file left"
}

kill9_no_recovery() {
    local id pid
    id=$(add_dev mem --size 16M)
    pid=$(list_word "$id" 7)
    kill -KILL "$pid"
    wait_for 40 sh -c "[ \"\$('$USERBLK' list -n $id | sed -n 2p | awk '{print \$11}')\" = DEAD ]" || die "device not DEAD after kill -9"
    dd if="/dev/ublkb$id" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null && die "I/O to a dead device succeeded"
    ub del -n "$id"
    wait_for 10 test ! -e "/dev/ublkc$id" || die "del did not remove a dead device"
}

read_only_file() {
    local id f pid
    f=$(backing ro.img 16M)
    printf 'hello' | dd of="$f" conv=notrunc status=none
    id=$(add_dev file -f "$f" -o)
    pid=$(list_word "$id" 7)
    [ "$(cat /sys/block/ublkb$id/ro)" = 1 ] || die "device not read-only"
    dd if=/dev/zero of="/dev/ublkb$id" bs=4k count=1 oflag=direct 2>/dev/null && die "write to a read-only device succeeded"
    kill -0 "$pid" || die "daemon died after a refused write"
    [ "$(head -c 5 "/dev/ublkb$id")" = hello ] || die "read from read-only device failed"
    del_dev "$id"
}

past_the_end() {
    local id pid
    id=$(add_dev mem --size 16M)
    pid=$(list_word "$id" 7)
    dd if=/dev/zero of="/dev/ublkb$id" bs=4k seek=4096 count=1 oflag=direct 2>/dev/null && die "write past the end succeeded"
    dd if="/dev/ublkb$id" of=/dev/null bs=4k skip=4096 count=1 iflag=direct status=none
    kill -0 "$pid" || die "daemon died"
    del_dev "$id"
}

bad_input() {
    expect_fail "no ublk device with id 999" ub del -n 999
    expect_fail "--size" ub add mem
    expect_fail "greater than 0" ub add mem --size 0
    expect_fail "multiple of the block size" ub add mem --size 1000
    expect_fail "No such file" ub add file -f /nonexistent.img
    expect_fail "not a regular file or block device" ub add file -f /dev/null
    expect_fail "not a regular file or block device" ub add file -f /tmp
    expect_fail "1..=4096" ub add -q 0 mem --size 1M
    expect_fail "1..=4096" ub add -d 5000 mem --size 1M
    expect_fail "io buffer size" ub add --io-buf-size 1000 mem --size 1M
    expect_fail "invalid size" ub add mem --size 12Q
    expect_fail "unrecognized subcommand" ub add nosuchtarget
    local f id
    f=$(backing empty.img 0)
    expect_fail "no data to serve" ub add file -f "$f"
    id=$(add_dev -n 7 mem --size 1M)
    [ "$id" = 7 ] || die "asked for id 7, got $id"
    expect_fail "already in use" ub add -n 7 mem --size 1M
    [ "$(list_word 7 11)" = LIVE ] || die "failed add disturbed the existing device"
    del_dev 7
}

file_on_block_device() { # the backing store is a block device (a loop device)
    local f loopdev id rc=0
    f=$(backing bdev.img 64M)
    loopdev=$(losetup -f --show "$f")
    ( set -e
      id=$(add_dev file -f "$loopdev")
      list_word "$id" 11 >/dev/null
      ub list -n "$id" | grep -q '"block_device":true' || die "not detected as a block device"
      fio_verify "/dev/ublkb$id"
      fs_cycle "/dev/ublkb$id"
      del_dev "$id" ) || rc=$?
    losetup -d "$loopdev"
    return $rc
}

file_on_ext4() { # a backing file on ext4: real FALLOC_FL_ZERO_RANGE and punch-hole
    local f loopdev mnt=/mnt/ub-host rc=0
    f=$(backing ext4host.img 160M)
    loopdev=$(losetup -f --show "$f")
    mkfs.ext4 -q -F "$loopdev"
    mkdir -p "$mnt"
    mount "$loopdev" "$mnt"
    ( set -e
      truncate -s 64M "$mnt/disk.img"
      id=$(add_dev file -f "$mnt/disk.img")
      fio_verify "/dev/ublkb$id"
      discard_zeroes "/dev/ublkb$id"
      # Discard must give space back to the host filesystem.
      dd if=/dev/urandom of="/dev/ublkb$id" bs=1M count=16 oflag=direct status=none
      before=$(du -k "$mnt/disk.img" | cut -f1)
      blkdiscard "/dev/ublkb$id"
      after=$(du -k "$mnt/disk.img" | cut -f1)
      echo "allocated before discard ${before}K, after ${after}K"
      [ "$after" -lt "$before" ] || die "discard did not free space in the backing file"
      fs_cycle "/dev/ublkb$id"
      del_dev "$id" ) || rc=$?
    umount "$mnt"
    losetup -d "$loopdev"
    return $rc
}

# The flags the kernel granted device $1.
dev_flags() { ub list -n "$1" --json | sed -n 's/^ *"flags": *\([0-9]*\),\{0,1\}$/\1/p' | head -n 1; }

user_copy_granted() { # --user-copy: the kernel grants USER_COPY; null reads zeroes through it
    local id flags
    id=$(add_dev null --size 1G --user-copy)
    flags=$(dev_flags "$id")
    [ -n "$flags" ] && [ $((flags & 0x80)) -ne 0 ] || die "flags ${flags:-?} lack USER_COPY (0x80)"
    dd if=/dev/urandom of="/dev/ublkb$id" bs=64k count=16 oflag=direct status=none
    [ "$(dd if="/dev/ublkb$id" bs=64k count=16 iflag=direct status=none | tr -d '\0' | wc -c)" = 0 ] ||
        die "null reads through user copy are not zero"
    del_dev "$id"
}

# The I/O scheduler: none by default (the kernel would give a 1-queue
# device mq-deadline), --scheduler NAME as given, `kernel` keeps the
# kernel's choice, an unknown name warns and the device works.
sched_of() { sed -n 's/.*\[\(.*\)\].*/\1/p' "/sys/block/ublkb$1/queue/scheduler"; }
scheduler_choice() {
    local id err
    id=$(add_dev null --size 1G)
    [ "$(sched_of "$id")" = none ] || die "default scheduler $(sched_of "$id"), not none"
    del_dev "$id"
    id=$(add_dev null --size 1G --scheduler mq-deadline)
    [ "$(sched_of "$id")" = mq-deadline ] || die "--scheduler mq-deadline gave $(sched_of "$id")"
    del_dev "$id"
    id=$(add_dev null --size 1G --scheduler kernel)
    [ "$(sched_of "$id")" = mq-deadline ] || die "--scheduler kernel gave $(sched_of "$id"), not the kernel's mq-deadline"
    del_dev "$id"
    err=$(mktemp -p "$WORK")
    id=$(add_dev null --size 1G --scheduler nosuch 2>"$err")
    grep -q -- "--scheduler nosuch" "$err" || die "no warning for an unknown scheduler: $(cat "$err")"
    dd if="/dev/ublkb$id" of=/dev/null bs=4k count=1 iflag=direct status=none
    del_dev "$id"
}

# --zero-copy on a kernel without UBLK_F_AUTO_BUF_REG (6.12): a warning that
# says why, then a working device that copies; a target that touches data
# in memory gets its own warning; --user-copy with it is refused.
zero_copy_falls_back() {
    local out id flags img
    img=$(backing zc.img 64M)
    out=$(ub add file -f "$img" --zero-copy 2>&1)
    echo "$out"
    id=$(dev_id_of "$out")
    [ -n "$id" ] || die "add file --zero-copy failed"
    if ub features | grep -q AUTO_BUF_REG; then
        echo "note: this kernel has AUTO_BUF_REG: zero copy is in use, not the fallback"
    else
        grep -q "zero copy: this kernel lacks automatic buffer registration" <<<"$out" ||
            die "no fallback warning from add --zero-copy"
        flags=$(dev_flags "$id")
        [ -n "$flags" ] && [ $((flags & 0x800)) -eq 0 ] || die "flags ${flags:-?} claim AUTO_BUF_REG"
    fi
    fio_verify "/dev/ublkb$id"
    del_dev "$id"
    # Without --zero-copy the default (zero copy where offered) says nothing.
    out=$(ub add file -f "$img" 2>&1)
    ! grep -qi "zero copy:.*lacks" <<<"$out" || die "a default file device warned about zero copy: $out"
    del_dev "$(dev_id_of "$out")"
    out=$(ub add early --size 64M --zero-copy 2>&1)
    grep -q "zero copy: only the null, mem, file, qcow2 and s3 targets, alone or under filters that never touch data" <<<"$out" ||
        die "no warning for zero copy on a target that touches data: $out"
    del_dev "$(dev_id_of "$out")"
    expect_fail "cannot be used with" ub add file -f "$img" --zero-copy --user-copy
}

has_auto_buf_reg() { ub features | grep -q AUTO_BUF_REG; }

# Where the kernel has UBLK_F_AUTO_BUF_REG (6.16+) a file device uses zero
# copy by default (--no-zero-copy opts out), and request data never passes
# through the daemon: after every tag has carried 512 KiB requests its
# resident memory is still small (copy mode touches depth x 512 KiB = 64 MiB
# of buffers), yet the data on the device is right.
zero_copy_granted() {
    has_auto_buf_reg || skip "this kernel lacks UBLK_F_AUTO_BUF_REG (Linux 6.16+): the VM suite on a 7.x kernel runs it"
    local img id flags pid rss
    img=$(backing zcg.img 256M)
    id=$(add_dev file -f "$img" --no-zero-copy)
    flags=$(dev_flags "$id")
    [ -n "$flags" ] && [ $((flags & 0x800)) -eq 0 ] || die "--no-zero-copy: flags ${flags:-?} have AUTO_BUF_REG (0x800)"
    del_dev "$id"
    id=$(add_dev file -f "$img")
    flags=$(dev_flags "$id")
    [ -n "$flags" ] && [ $((flags & 0x800)) -ne 0 ] || die "a default file device: flags ${flags:-?} lack AUTO_BUF_REG (0x800)"
    "${FIO[@]}" --name=zc-big --filename="/dev/ublkb$id" --rw=randrw --bs=512k --iodepth=128 \
        --size=100% --io_size=512M --verify=crc32c --verify_fatal=1
    pid=$(list_word "$id" 7)
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
    echo "note: daemon RSS after 512 KiB requests at depth 128 with zero copy: $rss KiB"
    [ "$rss" -lt 32768 ] || die "daemon RSS $rss KiB: request data went through its memory"
    cmp -n 1048576 "/dev/ublkb$id" "$img" || die "device and backing file differ"
    del_dev "$id"
}

# Filters that never touch request data keep zero copy: a file device under
# a stats filter is granted AUTO_BUF_REG and its data verifies.
zero_copy_through_stats() {
    has_auto_buf_reg || skip "this kernel lacks UBLK_F_AUTO_BUF_REG (Linux 6.16+): the VM suite on a 7.x kernel runs it"
    local img id flags
    img=$(backing zcs.img 64M)
    id=$(add_dev file -f "$img" --filter "stats:file=$WORK/zcs.json")
    flags=$(dev_flags "$id")
    [ -n "$flags" ] && [ $((flags & 0x800)) -ne 0 ] || die "file --filter stats: flags ${flags:-?} lack AUTO_BUF_REG (0x800)"
    "${FIO[@]}" --name=zc-stats --filename="/dev/ublkb$id" --rw=randrw --bs=64k --iodepth=32 \
        --size=100% --io_size=128M --verify=crc32c --verify_fatal=1
    del_dev "$id"
}

# The early target answers every write before a worker stores it: the slot
# state machine must hold each answer (and the tag's buffer) until the
# store is done, or fio's verify reads see old data. One and two queues.
early_answers_held() {
    local q id
    for q in 1 2; do
        id=$(add_dev early --size 64M -q "$q")
        # verify_backlog reads blocks back soon after their writes complete.
        "${FIO[@]}" --name="early-q$q" --filename="/dev/ublkb$id" --rw=randwrite --bsrange=4k-128k \
            --iodepth=64 --numjobs="$q" --offset_increment=32M --size=32M --io_size=64M \
            --verify=crc32c --verify_fatal=1 --verify_backlog=32
        del_dev "$id"
    done
}

# The cases target_cases LABEL CACHE DISCARD FS would run, each skipped for
# REASON, so that a kernel without a feature runs the plan's count too
# (keep in step with target_cases).
skip_target_cases() { # skip_target_cases REASON LABEL CACHE DISCARD FS
    local why=$1 label=$2 discard=$4 fs=$5 c
    local cases=("add, LIVE in list" "queue limits advertised" "fio verify whole device" "fsync-heavy fio")
    [ "$discard" = yes ] && cases+=("discard/write-zeroes read as zeroes")
    [ "$fs" = yes ] && cases+=("ext4 mkfs/mount/fsck/remount")
    cases+=("del removes device, daemon, state")
    for c in "${cases[@]}"; do case_run "$label: $c" skip "$why"; done
}

zero_copy_target_cases() {
    if has_auto_buf_reg; then
        target_cases "$@"
    else
        skip_target_cases "this kernel lacks UBLK_F_AUTO_BUF_REG (Linux 6.16+): the VM suite on a 7.x kernel runs them" "$@"
    fi
}

no_panics_logged() {
    ! grep -l panicked /run/userblk/*.log 2>/dev/null || die "a daemon panicked (see logs above)"
}

# ---- run ---------------------------------------------------------------------

echo "kernel $(uname -r); userblk $("$USERBLK" --version)"
cleanup_devices
plan 70  # 22 case_run below, and target_cases: 7 each (6 without ext4)
case_run "main job: add mem --size 1G is /dev/ublkb0, ext4 survives remount" main_job
case_run "features lists the kernel's flags" features_case
case_run "FUSE frontend beside ublk: own ids, one list" fuse_beside_ublk
case_run "null: 250G default, zero reads, fio" null_cases
target_cases "mem" "write through" yes yes mem --size 64M
target_cases "file (O_DIRECT, tmpfs)" "write back" yes yes file -f "$(backing direct.img 64M)"
target_cases "loop alias (buffered)" "write back" yes yes loop -f "$(backing buffered.img 64M)" --buffered
case_run "--user-copy: USER_COPY granted, null reads zero" user_copy_granted
target_cases "mem --user-copy" "write through" yes yes mem --size 64M --user-copy
target_cases "file --user-copy (O_DIRECT)" "write back" yes no file -f "$(backing uc.img 64M)" --user-copy
case_run "I/O scheduler: none by default, --scheduler NAME, kernel" scheduler_choice
case_run "--zero-copy: falls back with a warning where unsupported" zero_copy_falls_back
case_run "zero copy: file's default, no data through the daemon" zero_copy_granted
case_run "zero copy through a stats filter: granted, fio verify" zero_copy_through_stats
case_run "early-answering target: answers held until stored (fio verify, -q 1 and 2)" early_answers_held
zero_copy_target_cases "file --zero-copy (O_DIRECT)" "write back" yes yes file -f "$(backing zc2.img 64M)" --zero-copy
zero_copy_target_cases "file --zero-copy -q 2 (buffered)" "write back" yes yes file -f "$(backing zc3.img 64M)" --buffered -q 2 --zero-copy
case_run "file with --offset" sh -c "f=\$(mktemp -p $WORK); truncate -s 33M \$f; id=\$($USERBLK add file -f \$f --offset 1M | sed -n 's/^dev id \\([0-9]*\\):.*/\\1/p'); [ \$(cat /sys/block/ublkb\$id/size) = 65536 ] && $USERBLK del -n \$id"
case_run "file on a block device (loop)" file_on_block_device
case_run "file on ext4: zero-range, discard frees space" file_on_ext4
case_run "two devices at once" two_devices
case_run "-q 2 with two fio jobs" two_queues
case_run "del while fio runs: refused; --force returns 0, fio errors" del_under_load
case_run "SIGTERM stops and deletes cleanly" sigterm_stops
case_run "kill -9 without recovery: DEAD, del removes" kill9_no_recovery
case_run "read-only file: writes refused, daemon stays" read_only_file
case_run "request past the end refused, daemon stays" past_the_end
case_run "bad input: clear error, non-zero exit" bad_input
case_run "no daemon panicked" no_panics_logged
cleanup_devices
summary
