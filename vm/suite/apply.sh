#!/usr/bin/env bash
# Real-kernel suite for `userblk apply` on ublk: a pool comes up as
# /dev/ublkbN with its /dev/userblk/NAME links, a rerun keeps the daemons,
# a grown size goes through UPDATE_SIZE where the kernel has it (and is
# refused, changing nothing, where it has not), a device whose daemon died
# differs until --recreate, and an empty pool deletes everything.
# (FUSE: tests/host/apply.sh.) Runs inside the VM (vm/run.sh), as root,
# from the repository root.
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }

POOL=$(mktemp /tmp/pool.XXXXXX.toml)
M=$((1 << 20))

field() { # field NAME KEY
    ub list --name "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0][sys.argv[1]])' "$2"
}

pool_of() { # pool_of MEM-SIZE
    cat >"$POOL" <<EOF
[[device]]
name = "vol"
target = "null"
size = "64M"

[[device]]
name = "ram"
target = "mem"
size = "$1"
recovery = true
EOF
}

gone() {
    : >"$POOL"
    ub apply "$POOL"
    wait_for 10 test -z "$(ls /dev/ublkb* 2>/dev/null)" || die "devices left: $(ls /dev/ublkb*)"
    [ -z "$(ls -A /dev/userblk 2>/dev/null)" ] || die "links left: $(ls -A /dev/userblk)"
}

case_pool_comes_up_and_a_rerun_keeps_it() {
    pool_of 16M
    local out id pid
    out=$(ub apply "$POOL")
    echo "$out"
    [ "$(grep -c '^add .*now id [0-9]* at /dev/ublkb' <<<"$out")" = 2 ] || die "not two ublk devices"
    id=$(field ram id)
    [ "$(readlink /dev/userblk/ram)" = "/dev/ublkb$id" ] || die "no link for ram"
    [ "$(blockdev --getsize64 "/dev/ublkb$id")" = $((16 * M)) ] || die "ram is not 16M"
    pid=$(field ram pid)
    out=$(ub apply "$POOL")
    [ "$(grep -c '^keep ' <<<"$out")" = 2 ] || die "the rerun was not two keeps: $out"
    [ "$(field ram pid)" = "$pid" ] || die "the rerun changed ram's daemon"
    gone
}

case_grow_uses_update_size_or_is_refused() {
    pool_of 16M
    ub apply "$POOL" >/dev/null
    local id pid out rc=0
    id=$(field ram id)
    pid=$(field ram pid)
    pool_of 32M
    out=$(ub apply "$POOL" 2>&1) || rc=$?
    echo "$out"
    if ub features | grep -qw UPDATE_SIZE; then
        [ "$rc" = 0 ] || die "the grow failed"
        [ "$(blockdev --getsize64 "/dev/ublkb$id")" = $((32 * M)) ] || die "/dev/ublkb$id did not grow"
    else
        [ "$rc" = 1 ] || die "a refused grow exits 1, not $rc"
        grep -q '^grow *ram .*FAILED: .*6.16' <<<"$out" || die "the refusal does not say why"
        [ "$(blockdev --getsize64 "/dev/ublkb$id")" = $((16 * M)) ] || die "the refused grow changed the size"
        echo "note: no UPDATE_SIZE on $(uname -r): the grow was refused, as expected"
    fi
    [ "$(field ram pid)" = "$pid" ] || die "the grow changed the daemon"
    gone
}

case_dead_daemon_differs_until_recreate() {
    pool_of 16M
    ub apply "$POOL" >/dev/null
    local id pid out rc=0
    id=$(field ram id)
    pid=$(field ram pid)
    kill -9 "$pid"
    wait_for 30 exited "$pid" || die "daemon $pid did not die"
    out=$(ub apply "$POOL" 2>&1) || rc=$?
    echo "$out"
    [ "$rc" = 1 ] || die "a dead daemon left alone exits 1, not $rc"
    grep -q "^differs *ram .*daemon: not running" <<<"$out" || die "no differs line"
    out=$(ub apply --recreate "$POOL")
    echo "$out"
    grep -q '^recreate *ram .*now id [0-9]* at /dev/ublkb' <<<"$out" || die "not recreated"
    [ "$(field ram state)" = LIVE ] || die "ram is not LIVE"
    gone
}

plan 3
case_run pool_comes_up_and_a_rerun_keeps_it case_pool_comes_up_and_a_rerun_keeps_it
case_run grow_uses_update_size_or_is_refused case_grow_uses_update_size_or_is_refused
case_run dead_daemon_differs_until_recreate case_dead_daemon_differs_until_recreate
rm -f "$POOL"
summary
