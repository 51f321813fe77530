#!/usr/bin/env bash
# Host suite for device names (`add --name`, `--name` for `-n`, the
# /dev/userblk/NAME links) on the FUSE and NBD frontends: runs on this
# machine directly, as root. It re-runs itself in a private mount namespace
# with a tmpfs on /dev/userblk, so its links are its own. (ublk: vm/suite/names.sh.)
# Usage: bash tests/host/names.sh   (from the repository root; USERBLK overrides the binary)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

LINKS=/dev/userblk
private_name_links NAMES_PRIVATE userblk-names "$0" "$@"

host_suite names
trap 'del_own_devices; rm -rf "$WORK"' EXIT

needs_fuse() {
    [ -e /dev/fuse ] || skip "no /dev/fuse"
    [ -e /dev/loop-control ] || modprobe loop 2>/dev/null || skip "no loop devices"
}

# The value of "name" in `list --name NAME --json` (and that it is device ID).
json_name() { # json_name ID NAME
    ub list --name "$2" --json | python3 -c '
import json, sys
d = json.load(sys.stdin)
assert len(d) == 1 and d[0]["id"] == int(sys.argv[1]), d
print(d[0]["name"])' "$1"
}

case_name_links_the_loop_device() {
    needs_fuse
    local id blk
    read -r id blk < <(add_served --frontend fuse --loop --name db mem --size 16M)
    [[ $blk == /dev/loop* ]] || die "not a loop device: $blk"
    [ "$(readlink "$LINKS/db")" = "$blk" ] || die "$LINKS/db -> $(readlink "$LINKS/db"), not $blk"
    [ -b "$LINKS/db" ] || die "$LINKS/db does not lead to a block device"
    [ "$(json_name "$id" db)" = db ] || die "list --json has no name"
    ub list | grep -q "name db link $LINKS/db" || die "list does not show the name"
    # Another device has no name: null in JSON.
    local id2 blk2
    read -r id2 blk2 < <(add_served --frontend fuse mem --size 1M)
    ub list -n "$id2" --json | python3 -c 'import json,sys; assert json.load(sys.stdin)[0]["name"] is None'
    del_served "$id2"
    # --name in place of -n.
    ub resize --name db --size 32M
    [ "$(blockdev --getsize64 "$LINKS/db")" = $((32 << 20)) ] || die "resize --name did not resize"
    ub ctl --name db >/dev/null
    expect_fail "not both\|cannot be used with" ub list -n "$id" --name db
    ub del --name db
    [ ! -L "$LINKS/db" ] || die "del --name left $LINKS/db"
    [ ! -e "$USERBLK_STATE_DIR/$id.json" ] || die "del --name left the state"
}

case_file_without_loop_is_linked() {
    needs_fuse
    local id file
    read -r id file < <(add_served --frontend fuse --no-loop --name plain mem --size 4M)
    [ "$(readlink "$LINKS/plain")" = "$file" ] || die "$LINKS/plain -> $(readlink "$LINKS/plain"), not $file"
    echo hello | dd of="$LINKS/plain" conv=notrunc status=none
    del_served "$id"
    [ ! -L "$LINKS/plain" ] || die "link left after del"
}

case_duplicate_name_refused() {
    needs_fuse
    local id blk
    read -r id blk < <(add_served --frontend fuse --name twin mem --size 1M)
    expect_fail "name twin is in use by device $id" ub add --frontend fuse --name twin mem --size 1M
    [ "$(ls "$USERBLK_STATE_DIR"/*.json | wc -l)" = 1 ] || die "the refused add left a state"
    [ "$(readlink "$LINKS/twin")" = "$blk" ] || die "the refused add touched the link"
    del_served "$id"
}

case_unknown_name_is_one_line() {
    local cmd out
    for cmd in "list --name nope" "del --name nope" "recover --name nope" "upgrade --name nope" \
        "stats --name nope" "ctl --name nope" "resize --name nope --size 1M"; do
        # shellcheck disable=SC2086
        expect_fail "no device named nope" ub $cmd
        # shellcheck disable=SC2086
        out=$(ub $cmd 2>&1) || true
        [ "$(wc -l <<<"$out")" = 1 ] || die "$cmd: more than one line: $out"
    done
}

case_bad_names_refused() {
    local bad
    for bad in .hidden -dash 'a/b' 'a b' "$(printf 'x%.0s' {1..65})" ''; do
        expect_fail "not a valid device name" ub add --frontend fuse --name="$bad" mem --size 1M
    done
    local rc=0
    ub add --frontend fuse --name='a/b' mem --size 1M 2>/dev/null || rc=$?
    [ "$rc" = 2 ] || die "a bad name is a usage error (2), not $rc"
    ! ls "$USERBLK_STATE_DIR"/*.json >/dev/null 2>&1 || die "a refused add left a state"
}

case_concurrent_adds_one_wins() {
    needs_fuse
    local i won=0 lost=0 pids=()
    for i in 1 2 3 4; do
        ub add --frontend fuse --name race mem --size 1M >"$WORK/race.$i" 2>&1 &
        pids+=($!)
    done
    for i in 1 2 3 4; do
        if wait "${pids[$((i - 1))]}"; then
            won=$((won + 1))
        else
            lost=$((lost + 1))
            grep -q "name race is in use" "$WORK/race.$i" || die "loser $i says: $(cat "$WORK/race.$i")"
        fi
    done
    [ "$won" = 1 ] && [ "$lost" = 3 ] || die "$won adds won, $lost lost"
    [ "$(ls "$USERBLK_STATE_DIR"/*.json | wc -l)" = 1 ] || die "more than one device left"
    ub del --name race
}

case_killed_daemon_keeps_its_name_until_del() {
    needs_fuse
    local id blk pid
    read -r id blk < <(add_served --frontend fuse --loop --name ghost mem --size 4M)
    pid=$(list_word "$id" 7)
    kill -9 "$pid"
    wait_for 10 exited "$pid" || die "daemon $pid did not die"
    ub list --name ghost | grep -q "state DEAD" || die "the dead device is not listed by name"
    expect_fail "name ghost is in use by device $id" ub add --frontend fuse --name ghost mem --size 1M
    [ -L "$LINKS/ghost" ] || die "the link went with the daemon (del removes it)"
    ub del --name ghost
    [ ! -L "$LINKS/ghost" ] || die "del left the dead device's link"
    # The name is free again.
    read -r id blk < <(add_served --frontend fuse --name ghost mem --size 1M)
    del_served "$id"
}

case_nbd_device_has_a_name_but_no_link() {
    local id uri
    read -r id uri < <(add_served --frontend nbd --listen "unix:$WORK/n.sock" --name exported mem --size 1M)
    [ ! -e "$LINKS/exported" ] && [ ! -L "$LINKS/exported" ] || die "an NBD device got a link"
    [ "$(json_name "$id" exported)" = exported ] || die "list --json has no name"
    ub del --name exported
    [ ! -e "$USERBLK_STATE_DIR/$id.json" ] || die "state left"
}

plan 8
case_run name_links_the_loop_device case_name_links_the_loop_device
case_run file_without_loop_is_linked case_file_without_loop_is_linked
case_run duplicate_name_refused case_duplicate_name_refused
case_run unknown_name_is_one_line case_unknown_name_is_one_line
case_run bad_names_refused case_bad_names_refused
case_run concurrent_adds_one_wins case_concurrent_adds_one_wins
case_run killed_daemon_keeps_its_name_until_del case_killed_daemon_keeps_its_name_until_del
case_run nbd_device_has_a_name_but_no_link case_nbd_device_has_a_name_but_no_link
summary
