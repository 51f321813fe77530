#!/usr/bin/env bash
# Real-kernel suite for user recovery: the device outlives its daemon.
# Runs inside the VM (vm/run.sh), as root, from the repository root.
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
WORK=/run/recovery-suite
mkdir -p "$WORK"

state_is() { [ "$(list_word "$1" 11)" = "$2" ]; }

# kill -9 the daemon of device ID, wait for QUIESCED, recover, wait for LIVE.
# Prints the milliseconds from the kill to LIVE.
kill_and_recover() {
    local id=$1 pid start end
    pid=$(list_word "$id" 7)
    start=$(date +%s%N)
    kill -KILL "$pid"
    wait_for 30 state_is "$id" QUIESCED || die "device $id not QUIESCED after kill -9 (state $(list_word "$id" 11))"
    ub recover -n "$id" >/dev/null
    wait_for 10 state_is "$id" LIVE || die "device $id not LIVE after recover"
    end=$(date +%s%N)
    [ "$(list_word "$id" 7)" != "$pid" ] || die "pid did not change"
    echo $(((end - start) / 1000000))
}

mem_keeps_data() {
    local id shm
    id=$(add_dev -r mem --size 64M)
    shm=$(ub list -n "$id" | grep -o '"/dev/shm/[^"]*"' | tr -d '"')
    [ -f "$shm" ] || die "no shared data file for a recoverable mem device"
    dd if=/dev/urandom of="$WORK/pattern" bs=1M count=16 status=none
    dd if="$WORK/pattern" of="/dev/ublkb$id" bs=1M oflag=direct status=none
    echo "note: recovered in $(kill_and_recover "$id") ms"
    cmp -n 16777216 "$WORK/pattern" "/dev/ublkb$id" || die "data lost across recovery"
    ub list -n "$id" | grep -q '"type":"mem"' || die "target lost from list after recovery"
    del_dev "$id"
    [ ! -e "$shm" ] || die "del left the data file $shm"
}

io_waits_while_quiesced() {
    local id pid reader rc=0
    id=$(add_dev -r mem --size 16M)
    printf 'still here' | dd of="/dev/ublkb$id" oflag=direct,sync bs=512 conv=sync status=none
    pid=$(list_word "$id" 7)
    kill -KILL "$pid"
    wait_for 30 state_is "$id" QUIESCED || die "not QUIESCED"
    dd if="/dev/ublkb$id" of="$WORK/read" bs=4k count=1 iflag=direct status=none &
    reader=$!
    sleep 2
    kill -0 "$reader" 2>/dev/null || die "I/O completed while no daemon ran"
    ub recover -n "$id" >/dev/null
    wait "$reader" || rc=$?
    [ "$rc" = 0 ] || die "queued read failed after recovery"
    [ "$(head -c 10 "$WORK/read")" = "still here" ] || die "queued read returned the wrong data"
    del_dev "$id"
}

# fio writes and verifies while the daemon is killed and recovered ROUNDS
# times; with --reissue no request may fail and every block must verify.
# fio runs long enough for rounds of 5 s (a round takes about 3 s on a quiet
# host under TCG, and 5 s with another VM competing for the 2 cores).
fio_through_kills() { # fio_through_kills ROUNDS VERIFY(yes|no) ADD-ARGS...
    local rounds=$1 verify=$2; shift 2
    local id fiopid rc=0 times=() ms vargs=()
    id=$(add_dev --reissue "$@")
    # null stores nothing, so it can only show that every request completes.
    [ "$verify" = no ] || vargs=(--verify=crc32c --verify_backlog=256 --verify_fatal=1 --verify_state_save=0)
    fio --ioengine=io_uring --direct=1 --name=recover --filename="/dev/ublkb$id" --rw=randwrite \
        --bs=4k --iodepth=16 --size=100% --time_based --runtime=$((rounds * 6 + 20)) \
        "${vargs[@]}" --randrepeat=0 --output-format=json --output="$WORK/fio.json" &
    fiopid=$!
    sleep 2
    for _ in $(seq 1 "$rounds"); do
        kill -0 "$fiopid" 2>/dev/null || die "fio ended early"
        ms=$(kill_and_recover "$id")
        times+=("$ms")
        sleep 1
    done
    wait "$fiopid" || rc=$?
    [ "$rc" = 0 ] || { tail -n 30 "$WORK/fio.json"; die "fio failed (exit $rc) across kill/recover"; }
    python3 - "$WORK/fio.json" "${times[@]}" <<'EOF'
import json, statistics, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
times = sorted(int(t) for t in sys.argv[2:])
assert job["error"] == 0, f"fio error {job['error']}"
clat_max_ms = job["write"]["clat_ns"]["max"] / 1e6
print(f"note: rounds {len(times)}: kill -9 to LIVE median {statistics.median(times):.0f} ms "
      f"(min {times[0]}, max {times[-1]}); fio max write latency {clat_max_ms:.0f} ms; "
      f"{job['write']['total_ios']} writes completed")
EOF
    del_dev "$id"
}

ext4_survives() {
    local id mnt=/mnt/ub-rec
    id=$(add_dev -r file -f "$(truncate -s 128M "$WORK/ext4.img"; echo "$WORK/ext4.img")")
    mkfs.ext4 -q -F "/dev/ublkb$id"
    mkdir -p "$mnt"
    mount "/dev/ublkb$id" "$mnt"
    dd if=/dev/urandom of="$mnt/blob" bs=1M count=8 conv=fsync status=none
    local sum
    sum=$(sha256sum <"$mnt/blob")
    echo "note: recovered in $(kill_and_recover "$id") ms"
    [ "$(sha256sum <"$mnt/blob")" = "$sum" ] || die "fsync'd file changed"
    echo after >"$mnt/new" && sync
    umount "$mnt"
    # The new daemon started while ext4 was mounted: it must not hold it.
    not_held "/dev/ublkb$id" "after umount of the recovered device"
    fsck.ext4 -n -f "/dev/ublkb$id"
    del_dev "$id"
}

# A daemon started while a file system is mounted (here on a loop device)
# must not keep it alive after the user unmounts it.
no_pinned_mounts() {
    local id loop mnt=/mnt/ub-pin
    truncate -s 64M "$WORK/pin.img"
    loop=$(losetup -f --show "$WORK/pin.img")
    mkfs.ext4 -q -F "$loop"
    mkdir -p "$mnt"
    mount "$loop" "$mnt"
    id=$(add_dev -r null --size 64M)
    umount "$mnt"
    not_held "$loop" "after umount with a daemon started while it was mounted"
    mount "$loop" "$mnt"
    echo "note: recovered in $(kill_and_recover "$id") ms"
    umount "$mnt"
    not_held "$loop" "after umount with a recovered daemon"
    losetup -d "$loop"
    del_dev "$id"
}

without_r_is_dead() {
    local id pid
    id=$(add_dev -n 3 mem --size 16M)
    pid=$(list_word "$id" 7)
    kill -KILL "$pid"
    wait_for 10 state_is "$id" DEAD || die "not DEAD within 10 s"
    expect_fail "created without recovery" ub recover -n "$id"
    ub del -n "$id"
    id=$(add_dev -n 3 mem --size 16M)
    [ "$id" = 3 ] || die "id 3 not reusable"
    del_dev 3
}

recover_bad_input() {
    local id
    expect_fail "no ublk device with id 77" ub recover -n 77
    id=$(add_dev -r mem --size 16M)
    expect_fail "is LIVE" ub recover -n "$id"
    [ "$(list_word "$id" 11)" = LIVE ] || die "a refused recover changed the device"
    local pid
    pid=$(list_word "$id" 7)
    kill -KILL "$pid"
    wait_for 30 state_is "$id" QUIESCED || die "not QUIESCED"
    cp "/run/userblk/$id.json" "$WORK/saved.json"
    echo '{ not json' >"/run/userblk/$id.json"
    expect_fail "state file" ub recover -n "$id"
    rm "/run/userblk/$id.json"
    expect_fail "no saved state" ub recover -n "$id"
    state_is "$id" QUIESCED || die "failed recovers changed the state"
    cp "$WORK/saved.json" "/run/userblk/$id.json"
    ub recover -n "$id" >/dev/null
    state_is "$id" LIVE || die "recover after the bad attempts failed"
    del_dev "$id"
}

del_quiesced() {
    local id pid shm
    id=$(add_dev -r mem --size 16M)
    shm=$(ub list -n "$id" | grep -o '"/dev/shm/[^"]*"' | tr -d '"')
    pid=$(list_word "$id" 7)
    kill -KILL "$pid"
    wait_for 30 state_is "$id" QUIESCED || die "not QUIESCED"
    ub del -n "$id"
    wait_for 10 test ! -e "/dev/ublkc$id" || die "del of a QUIESCED device failed"
    [ ! -e "$shm" ] || die "del left the data file"
}

# One queue thread fails (fail point: queue 1 after 50 requests) while queue
# 0 is healthy; the daemon closes every queue and the kernel decides.
queue_failure() { # queue_failure EXPECTED-STATE ADD-ARGS...
    local expect=$1; shift
    local id rc=0
    id=$(USERBLK_FAILPOINT=queue-exit:1:50 add_dev -q 2 "$@")
    [ "$(ub list -n "$id" | grep -c 'queue [01]: tid')" = 2 ] || die "expected two queues"
    # The CPU whose requests the kernel maps to queue 1 (6.12 maps CPU 1,
    # 7.x CPU 0): fio runs there so that queue 1 sees I/O and fails.
    local cpu
    cpu=$(ub list -n "$id" | sed -n 's/.*queue 1: tid [0-9]* affinity(\([0-9]*\).*/\1/p')
    [ -n "$cpu" ] || die "no affinity listed for queue 1"
    dd if=/dev/urandom of="$WORK/half" bs=1M count=8 status=none
    dd if="$WORK/half" of="/dev/ublkb$id" bs=1M seek=32 oflag=direct status=none
    timeout 120 taskset -c "$cpu" fio --ioengine=io_uring --direct=1 --name=qfail --filename="/dev/ublkb$id" \
        --rw=randwrite --bs=4k --iodepth=8 --size=32M --io_size=64M >"$WORK/qfail.out" 2>&1 &
    local fiopid=$!
    wait_for 60 state_is "$id" "$expect" || die "device not $expect after a queue failed (state $(list_word "$id" 11))"
    echo "note: one failed queue left the device $expect"
    if [ "$expect" = QUIESCED ]; then
        ub recover -n "$id" >/dev/null
        state_is "$id" LIVE || die "recover after a queue failure did not bring it back"
        wait "$fiopid" || rc=$?
        echo "fio exit $rc after recovery"
        cmp -i 0:33554432 -n 8388608 "$WORK/half" "/dev/ublkb$id" || die "data lost across the queue failure"
    else
        wait "$fiopid" || true
    fi
    ub del -n "$id"
    wait_for 10 test ! -e "/dev/ublkc$id" || die "del did not remove the device"
}

adopt_like_a_service() { # what userblk@.service does: the same command after a crash recovers
    local cmd=("$USERBLK" add --foreground --adopt -n 9 -r mem --size 16M) pid shm
    "${cmd[@]}" >"$WORK/svc1.log" 2>&1 &
    wait_for 20 test -b /dev/ublkb9 || die "first start did not create /dev/ublkb9"
    wait_for 10 state_is 9 LIVE || die "not LIVE"
    printf 'service data' | dd of=/dev/ublkb9 oflag=direct,sync bs=512 conv=sync status=none
    shm=$(ub list -n 9 | grep -o '"/dev/shm/[^"]*"' | tr -d '"')
    pid=$(list_word 9 7)
    kill -KILL "$pid"
    wait_for 30 state_is 9 QUIESCED || die "not QUIESCED"
    "${cmd[@]}" >"$WORK/svc2.log" 2>&1 &
    pid=$!
    wait_for 20 state_is 9 LIVE || { cat "$WORK/svc2.log"; die "restart did not recover the device"; }
    [ "$(head -c 12 /dev/ublkb9)" = "service data" ] || die "data lost across the restart"
    kill -TERM "$pid"
    wait_for 20 test ! -e /dev/ublkc9 || die "SIGTERM did not delete the device"
    [ ! -e "$shm" ] || die "data file left after a clean stop"
}

echo "kernel $(uname -r); userblk $("$USERBLK" --version)"
ub features | grep -q USER_RECOVERY || { echo "SKIP all: kernel lacks USER_RECOVERY"; exit 1; }
cleanup_devices
plan 15  # the zero-copy case runs or is skipped: one either way
case_run "mem -r: data survives kill -9 and recover" mem_keeps_data
case_run "I/O waits while QUIESCED, served after recover" io_waits_while_quiesced
case_run "null --reissue: fio I/O completes across 20 kill/recover" fio_through_kills 20 no null --size 1G
case_run "mem --reissue: fio verify across 20 kill/recover" fio_through_kills 20 yes mem --size 64M
case_run "file --reissue: fio verify across 20 kill/recover" fio_through_kills 20 yes file -f "$(truncate -s 64M "$WORK/fio.img"; echo "$WORK/fio.img")"
if ub features | grep -q AUTO_BUF_REG; then
    case_run "file --zero-copy --reissue: fio verify across 10 kill/recover" fio_through_kills 10 yes file -f "$(truncate -s 64M "$WORK/zc.img"; echo "$WORK/zc.img")" --zero-copy
else
    case_run "file --zero-copy --reissue: fio verify across kill/recover" skip "this kernel lacks UBLK_F_AUTO_BUF_REG (Linux 6.16+): the VM suite on a 7.x kernel runs it"
fi
case_run "ext4 on a recovered file device: intact, fsck clean" ext4_survives
case_run "daemons keep no file system mounted after umount" no_pinned_mounts
case_run "kill without -r: DEAD, del, id reusable" without_r_is_dead
case_run "recover: bad input refused, nothing changed" recover_bad_input
case_run "del of a QUIESCED device frees its data" del_quiesced
case_run "add --adopt recovers after a crash (systemd unit)" adopt_like_a_service
case_run "one queue fails, -r: QUIESCED, recover, data intact" queue_failure QUIESCED -r mem --size 64M
case_run "one queue fails, no -r: DEAD, del works" queue_failure DEAD mem --size 64M
case_run "no daemon panicked" sh -c '! grep -l panicked /run/userblk/*.log 2>/dev/null'
cleanup_devices
summary
