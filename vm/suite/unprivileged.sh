#!/usr/bin/env bash
# Real-kernel suite for unprivileged devices (UBLK_F_UNPRIVILEGED_DEV).
# Runs inside the VM (vm/run.sh), as root, from the repository root; the
# user's side runs as a bare numeric uid through setpriv (the guest's
# /etc/passwd is the host's, read-only, so no user can be added).
#
# The VM has no udevd. This suite stands in for contrib/udev/70-userblk.rules:
# it makes /dev/ublk-control 0666 and runs a polling loop that applies
# contrib/udev/userblk-owner to every new /dev/ublkcN and /dev/ublkbN node,
# as the rule's RUN+= would on each add event.
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
[ -e /dev/ublk-control ] || modprobe ublk_drv || true

WORK=/run/unprivileged-suite
mkdir -p "$WORK"
TEST_UID=${TEST_UID:-1000}
OTHER_UID=$((TEST_UID + 1))
HELPER=$PWD/contrib/udev/userblk-owner

# Run a command as uid:gid N with no supplementary groups and a clean
# environment for the state directory (falls back to /tmp/userblk-N).
as_uid() { # as_uid N COMMAND...
    local n=$1; shift
    setpriv --reuid="$n" --regid="$n" --clear-groups \
        env -u XDG_RUNTIME_DIR -u USERBLK_STATE_DIR HOME=/tmp "$@"
}
as_user() { as_uid "$TEST_UID" "$@"; }
ub_user() { as_user "$USERBLK" "$@"; }

# ---- the udev stand-in (start_owner_loop, stop_owner_loop) ----------------------

. vm/suite/owner-loop.sh

# ---- helpers ------------------------------------------------------------------

state_is() { [ "$(list_word "$1" 11)" = "$2" ]; }
json_field() { # json_field ID FIELD (root's view)
    ub list -n "$1" --json | sed -n "s/^ *\"$2\": *\([0-9]*\),\{0,1\}\$/\1/p" | head -n 1
}
user_state_dir() { echo "/tmp/userblk-$1"; }

# `add` as uid N; prints the id.
user_add() { # user_add N ADD-ARGS...
    local n=$1 out id; shift
    out=$(as_uid "$n" "$USERBLK" add "$@") || { echo "$out"; return 1; }
    echo "$out" >&2
    id=$(dev_id_of "$out")
    [ -n "$id" ] || die "no id in add output"
    echo "$id"
}

# The device's nodes, daemon and state are gone.
gone() { # gone ID PID STATE-FILE
    wait_for 10 test ! -e "/dev/ublkb$1" || die "/dev/ublkb$1 still exists"
    wait_for 10 test ! -e "/dev/ublkc$1" || die "/dev/ublkc$1 still exists"
    wait_for 10 sh -c "! kill -0 $2 2>/dev/null || grep -q '^State:.*Z' /proc/$2/status" ||
        die "daemon $2 still running"
    wait_for 5 test ! -e "$3" || die "state file $3 left behind"
}

# ---- cases --------------------------------------------------------------------

user_lifecycle() { # add, fio as the user, list, del
    local id pid flags
    id=$(user_add "$TEST_UID" mem --size 64M)
    [ -b "/dev/ublkb$id" ] || die "/dev/ublkb$id missing after add"
    state_is "$id" LIVE || die "device $id not LIVE"
    [ "$(json_field "$id" owner_uid)" = "$TEST_UID" ] || die "owner_uid is not $TEST_UID"
    [ "$(json_field "$id" owner_gid)" = "$TEST_UID" ] || die "owner_gid is not $TEST_UID"
    flags=$(json_field "$id" flags)
    [ $((flags & 0x20)) -ne 0 ] || die "flags $flags lack UNPRIVILEGED_DEV"
    [ "$(stat -c %u:%g:%a "/dev/ublkc$id")" = "$TEST_UID:$TEST_UID:600" ] || die "ublkc$id: $(stat -c %u:%g:%a "/dev/ublkc$id")"
    [ "$(stat -c %u:%g:%a "/dev/ublkb$id")" = "$TEST_UID:$TEST_UID:660" ] || die "ublkb$id: $(stat -c %u:%g:%a "/dev/ublkb$id")"
    as_user fio --name=unpriv --filename="/dev/ublkb$id" --ioengine=io_uring --direct=1 \
        --rw=randwrite --bs=4k --iodepth=8 --size=16M --verify=crc32c --verify_fatal=1 \
        --do_verify=1 --verify_state_save=0 --randrepeat=0 --output-format=terse --minimal >"$WORK/fio.out" ||
        { cat "$WORK/fio.out"; die "fio as uid $TEST_UID failed"; }
    ub_user list | grep -q "^dev id $id:" || die "the user's list does not show device $id"
    ub_user list -n "$id" | grep -q '"type":"mem"' || die "the user's list lacks the target"
    [ -f "$(user_state_dir "$TEST_UID")/$id.json" ] || die "no state file in $(user_state_dir "$TEST_UID")"
    pid=$(list_word "$id" 7)
    [ "$(stat -c %u "/proc/$pid")" = "$TEST_UID" ] || die "daemon $pid does not run as uid $TEST_UID"
    ub_user del -n "$id"
    gone "$id" "$pid" "$(user_state_dir "$TEST_UID")/$id.json"
}

user_cannot_del_roots() {
    local id
    id=$(add_dev mem --size 16M)
    expect_fail "device $id belongs to uid 0" ub_user del -n "$id"
    state_is "$id" LIVE || die "root's device $id is not LIVE after the refused del"
    expect_fail "device $id belongs to uid 0" ub_user list -n "$id"
    ub_user list >"$WORK/list.out" 2>"$WORK/list.err"
    ! grep -q "^dev id $id:" "$WORK/list.out" || die "the user's list shows root's device"
    grep -q "of other users not shown" "$WORK/list.err" || die "no note about hidden devices: $(cat "$WORK/list.err")"
    ub_user del -a # only the user's own devices (none): succeeds, touches nothing
    state_is "$id" LIVE || die "root's device $id is not LIVE after the user's del -a"
    del_dev "$id"
}

users_cannot_touch_each_other() {
    local id pid
    id=$(user_add "$TEST_UID" null --size 1G)
    expect_fail "device $id belongs to uid $TEST_UID" as_uid "$OTHER_UID" "$USERBLK" del -n "$id"
    state_is "$id" LIVE || die "device $id is not LIVE after the other user's del"
    pid=$(list_word "$id" 7)
    ub_user del -n "$id"
    gone "$id" "$pid" "$(user_state_dir "$TEST_UID")/$id.json"
}

root_deletes_users() {
    local id pid
    id=$(user_add "$TEST_UID" mem --size 16M)
    pid=$(list_word "$id" 7)
    ub del -n "$id"
    gone "$id" "$pid" "$(user_state_dir "$TEST_UID")/$id.json"
}

user_copy_falls_back() { # the kernel refuses USER_COPY to users: a warning, then the copy path
    local id flags out
    out=$(as_uid "$TEST_UID" "$USERBLK" add mem --size 16M --user-copy 2>&1) || { echo "$out"; return 1; }
    echo "$out"
    id=$(dev_id_of "$out")
    [ -n "$id" ] || die "no id in add output"
    grep -qi "user copy" "$(user_state_dir "$TEST_UID")/$id.log" 2>/dev/null || grep -qi "user copy" <<<"$out" ||
        die "no warning about the user copy fallback"
    flags=$(json_field "$id" flags)
    [ $((flags & 0x80)) -eq 0 ] || die "flags $flags have USER_COPY for an unprivileged device"
    as_user fio --name=uc --filename="/dev/ublkb$id" --ioengine=io_uring --direct=1 \
        --rw=randwrite --bs=4k --iodepth=8 --size=8M --verify=crc32c --verify_fatal=1 \
        --do_verify=1 --verify_state_save=0 --randrepeat=0 --output-format=terse --minimal >/dev/null ||
        die "fio verify failed on the fallback path"
    as_uid "$TEST_UID" "$USERBLK" del -n "$id"
}

user_add_r_refused() {
    local before after
    before=$(ls /sys/class/ublk-char | wc -l)
    expect_fail "need root" ub_user add -r mem --size 16M
    expect_fail "need root" ub_user add --reissue null
    after=$(ls /sys/class/ublk-char | wc -l)
    [ "$before" = "$after" ] || die "a refused add -r left a device behind"
}

user_cannot_recover_roots() {
    local id pid
    id=$(add_dev -r mem --size 16M)
    pid=$(list_word "$id" 7)
    kill -KILL "$pid"
    wait_for 30 state_is "$id" QUIESCED || die "not QUIESCED after kill -9"
    expect_fail "device $id belongs to uid 0" ub_user recover -n "$id"
    state_is "$id" QUIESCED || die "the refused recover changed the state"
    ub recover -n "$id" >/dev/null
    wait_for 10 state_is "$id" LIVE || die "root could not recover after the user's attempt"
    del_dev "$id"
}

root_unprivileged_is_privileged() { # the kernel clears UNPRIVILEGED_DEV for root
    local id flags
    id=$(add_dev --unprivileged mem --size 16M)
    flags=$(json_field "$id" flags)
    [ $((flags & 0x20)) -eq 0 ] || die "root got an unprivileged device (flags $flags)"
    [ "$(stat -c %u "/dev/ublkb$id")" = 0 ] || die "the helper chowned a privileged device"
    del_dev "$id"
}

no_control_access() {
    chmod 0600 /dev/ublk-control
    local rc=0
    expect_fail "docs/unprivileged.md" ub_user list || rc=$?
    chmod 0666 /dev/ublk-control
    return "$rc"
}

echo "kernel $(uname -r); userblk $("$USERBLK" --version); test uid $TEST_UID"
ub features | grep -q UNPRIVILEGED_DEV || { echo "SKIP all: kernel lacks UNPRIVILEGED_DEV"; exit 1; }
command -v setpriv >/dev/null || { echo "no setpriv (util-linux)"; exit 2; }
cleanup_devices
start_owner_loop
trap stop_owner_loop EXIT
plan 10
case_run "user: add mem, fio verify, list, del" user_lifecycle
case_run "user: refused del of root's device, still LIVE" user_cannot_del_roots
case_run "user: refused del of another user's device" users_cannot_touch_each_other
case_run "root: deletes a user's device" root_deletes_users
case_run "user: add -r / --reissue refused up front" user_add_r_refused
case_run "user: --user-copy falls back to kernel copies, says so" user_copy_falls_back
case_run "user: refused recover of root's device" user_cannot_recover_roots
case_run "root: --unprivileged gives a privileged device" root_unprivileged_is_privileged
case_run "user: no access to ublk-control points to docs" no_control_access
# The user's daemons log under /tmp/userblk-UID (not the VM runner's /tmp/userblk-vm.* of the host's /tmp).
case_run "no daemon panicked" sh -c '! grep -l "panicked at" /run/userblk/*.log /tmp/userblk-[0-9]*/*.log 2>/dev/null'
cleanup_devices
stop_owner_loop
summary
