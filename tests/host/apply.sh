#!/usr/bin/env bash
# Host suite for `userblk apply POOL.toml` on the FUSE frontend: runs on
# this machine directly, as root. Plans and convergence: add from empty, a
# no-op rerun (same pids), removal, growth (resize, the loop device sees
# it), a changed option (differs, or recreated with --recreate), --dry-run,
# --json, bad files, a device in use, and an apply killed half way. It
# re-runs itself in a private mount namespace with a tmpfs on /dev/userblk,
# so the name links are its own.
# Usage: bash tests/host/apply.sh   (from the repository root; USERBLK overrides the binary)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

LINKS=/dev/userblk
private_name_links APPLY_PRIVATE userblk-apply "$0" "$@"

host_suite apply
trap 'del_own_devices; rm -rf "$WORK"' EXIT
POOL=$WORK/pool.toml
M=$((1 << 20))

needs_fuse() {
    [ -e /dev/fuse ] || skip "no /dev/fuse"
    [ -e /dev/loop-control ] || modprobe loop 2>/dev/null || skip "no loop devices"
}

# The pool file, from stdin.
pool() { cat >"$POOL"; }

# One field of device NAME's `list --json` entry.
field() { # field NAME KEY
    ub list --name "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0][sys.argv[1]])' "$2"
}

# "NAME PID" for every named device, sorted: what must not change across a no-op.
pids() {
    ub list --json | python3 -c '
import json, sys
for d in sorted(json.load(sys.stdin), key=lambda d: str(d["name"])):
    if d["name"]:
        print(d["name"], d["pid"])'
}

states() { ls "$USERBLK_STATE_DIR"/*.json 2>/dev/null | grep -vc '/stats-' || true; }
some_states() { [ "$(states)" != 0 ]; }

# The pool's devices are gone: no state, mount or link left.
nothing_left() {
    [ "$(states)" = 0 ] || die "state files left: $(ls "$USERBLK_STATE_DIR")"
    ! grep -q "$USERBLK_STATE_DIR" /proc/self/mounts || die "a FUSE mount is left: $(grep "$USERBLK_STATE_DIR" /proc/self/mounts)"
    [ -z "$(ls -A "$LINKS")" ] || die "links left: $(ls -A "$LINKS")"
}

empty_pool() { : >"$POOL"; ub apply "$POOL"; nothing_left; }

two_devices() {
    pool <<EOF
[[device]]
name = "alpha"
target = "mem"
size = "16M"
frontend = "fuse"

[[device]]
name = "beta"
target = "null"
size = "1G"
frontend = "fuse"
filter = ["stats"]
EOF
}

case_add_from_empty_then_rerun_is_a_no_op() {
    needs_fuse
    two_devices
    local out before
    out=$(ub apply "$POOL")
    echo "$out"
    [ "$(grep -c '^add ' <<<"$out")" = 2 ] || die "not two adds"
    [ "$(field alpha state)" = LIVE ] && [ "$(field beta state)" = LIVE ] || die "not both live"
    [ -e "$LINKS/alpha" ] || die "no link for alpha"
    before=$(pids)
    out=$(ub apply "$POOL")
    echo "$out"
    [ "$(grep -c '^keep ' <<<"$out")" = 2 ] && [ "$(wc -l <<<"$out")" = 2 ] || die "the rerun was not two keeps"
    [ "$(pids)" = "$before" ] || die "the rerun changed daemons: $before -> $(pids)"
    # The same devices in other spellings of the same options are kept too.
    sed -i 's/"16M"/16777216/; s/target = "null"/target = "null"\ndepth = 128/' "$POOL"
    out=$(ub apply "$POOL")
    [ "$(grep -c '^keep ' <<<"$out")" = 2 ] || die "a respelt file is not a no-op: $out"
    [ "$(pids)" = "$before" ] || die "a respelt file changed daemons"
    empty_pool
}

case_removed_devices_go_others_stay() {
    needs_fuse
    two_devices
    ub apply "$POOL" >/dev/null
    local hand named alpha out
    hand=$(ub add --frontend fuse mem --size 1M | sed -n 's/^dev id \([0-9]*\):.*/\1/p')
    ub add --frontend fuse --name by-hand mem --size 1M >/dev/null
    alpha=$(field alpha pid)
    python3 - "$POOL" <<'EOF'
import sys
text = open(sys.argv[1]).read()
open(sys.argv[1], "w").write(text.split("\n\n")[0] + "\n")
EOF
    out=$(ub apply "$POOL")
    echo "$out"
    grep -q '^delete *beta ' <<<"$out" || die "beta not deleted"
    ! ub list --name beta >/dev/null 2>&1 || die "beta still runs"
    [ "$(field alpha pid)" = "$alpha" ] || die "alpha was touched"
    [ "$(field by-hand state)" = LIVE ] || die "a named device apply did not add was touched"
    ub list -n "$hand" >/dev/null || die "a device without a name was touched"
    ub del --name by-hand
    ub del -n "$hand"
    empty_pool
}

case_grow_resizes_in_place() {
    needs_fuse
    pool <<EOF
[[device]]
name = "big"
target = "mem"
size = "16M"
frontend = "fuse"
loop = true
EOF
    ub apply "$POOL" >/dev/null
    local pid blk out
    pid=$(field big pid)
    blk=$(field big block_device)
    [[ $blk == /dev/loop* ]] || die "not a loop device: $blk"
    [ "$(blockdev --getsize64 "$blk")" = $((16 * M)) ] || die "not 16M first"
    sed -i 's/"16M"/"32M"/' "$POOL"
    out=$(ub apply "$POOL")
    echo "$out"
    grep -q "^grow *big *id [0-9]*: $((16 * M)) -> $((32 * M)) bytes" <<<"$out" || die "no grow line"
    [ "$(field big pid)" = "$pid" ] || die "the daemon changed"
    [ "$(blockdev --getsize64 "$blk")" = $((32 * M)) ] || die "the loop device has $(blockdev --getsize64 "$blk") bytes"
    out=$(ub apply "$POOL")
    grep -q '^keep *big' <<<"$out" || die "not kept after the grow: $out"
    # Shrinking is not growing: reported, left alone.
    sed -i 's/"32M"/"8M"/' "$POOL"
    local rc=0
    out=$(ub apply "$POOL" 2>&1) || rc=$?
    echo "$out"
    [ "$rc" = 1 ] || die "a shrink that is left alone exits 1, not $rc"
    grep -q "^differs *big .*size: $((32 * M)) -> $((8 * M))" <<<"$out" || die "no differs line for the shrink"
    [ "$(blockdev --getsize64 "$blk")" = $((32 * M)) ] || die "the shrink was done"
    [ "$(field big pid)" = "$pid" ] || die "the daemon changed"
    empty_pool
}

case_changed_option_differs_until_recreate() {
    needs_fuse
    local img=$WORK/disk.img pid out rc=0
    truncate -s 8M "$img"
    pool <<EOF
[[device]]
name = "img"
target = "file"
file = "$img"
frontend = "fuse"
EOF
    ub apply "$POOL" >/dev/null
    pid=$(field img pid)
    echo 'buffered = true' >>"$POOL"
    out=$(ub apply "$POOL" 2>&1) || rc=$?
    echo "$out"
    [ "$rc" = 1 ] || die "a difference left alone exits 1, not $rc"
    grep -q '^differs *img .*buffered: false -> true' <<<"$out" || die "no differs line"
    grep -q -- '--recreate' <<<"$out" || die "the error does not say --recreate"
    [ "$(field img pid)" = "$pid" ] || die "the device was touched without --recreate"
    out=$(ub apply --recreate "$POOL")
    echo "$out"
    grep -q '^recreate *img .*now id [0-9]* at ' <<<"$out" || die "no recreate line"
    [ "$(field img pid)" != "$pid" ] || die "not recreated"
    grep -q -- '"--buffered"' "$USERBLK_STATE_DIR/$(field img id).json" || die "the new device was added without --buffered"
    out=$(ub apply "$POOL")
    grep -q '^keep *img' <<<"$out" || die "not kept after --recreate: $out"
    empty_pool
}

case_dry_run_changes_nothing_json_parses() {
    needs_fuse
    two_devices
    ub apply "$POOL" >/dev/null
    local before out
    before=$(pids)
    cat >>"$POOL" <<EOF

[[device]]
name = "gamma"
target = "mem"
size = "4M"
frontend = "fuse"
EOF
    sed -i 's/"1G"/"2G"/; s/name = "alpha"/name = "alpha2"/' "$POOL"
    out=$(ub apply --dry-run "$POOL")
    echo "$out"
    grep -q '^add *gamma *mem ' <<<"$out" || die "no add line"
    grep -q '^add *alpha2 ' <<<"$out" || die "no add line for the renamed device"
    grep -q '^delete *alpha ' <<<"$out" || die "no delete line"
    grep -q '^grow *beta ' <<<"$out" || die "no grow line"
    [ "$(pids)" = "$before" ] || die "--dry-run changed devices"
    ! ub list --name gamma >/dev/null 2>&1 || die "--dry-run added gamma"
    ub apply --dry-run --json "$POOL" | python3 -c '
import json, sys
d = json.load(sys.stdin)
assert d["dry_run"] and not d["converged"], d
acts = {x["name"]: x["action"] for x in d["devices"]}
assert acts == {"alpha": "delete", "alpha2": "add", "beta": "grow", "gamma": "add"}, acts
assert all(x["ok"] is None for x in d["devices"]), d'
    ub apply --json "$POOL" | python3 -c '
import json, sys
d = json.load(sys.stdin)
assert d["converged"] and not d["dry_run"], d
for x in d["devices"]:
    assert x["ok"] is True and x["error"] is None, x
    if x["action"] == "add":
        assert x["now"]["block_device"], x
g = [x for x in d["devices"] if x["action"] == "grow"][0]
assert g["to"] == 2 << 30, g'
    empty_pool
}

case_bad_files_exit_2_and_change_nothing() {
    local text says rc out managed
    managed=$(cat "$USERBLK_STATE_DIR/pool.managed" 2>/dev/null || true)
    while IFS='|' read -r text says; do
        printf '%b' "$text" >"$POOL"
        rc=0
        out=$(ub apply "$POOL" 2>&1) || rc=$?
        echo "$out"
        [ "$rc" = 2 ] || die "exit $rc, not 2, for: $text"
        [ "$(wc -l <<<"$out")" = 1 ] || die "more than one line: $out"
        grep -qF -- "$POOL: $says" <<<"$out" || die "'$out' does not say '$POOL: $says'"
    done <<'EOF'
[[device]]\nname = "a"\ntarget = "mem"\nsize = "1M"\n\n[[device]]\nname = "b"\ntarget = "mem"\nsise = "1M"\n|device 2 (b): unknown key "sise"
[[device]]\nname = "a"\ntarget = "null"\n[[device]]\nname = "a"\ntarget = "null"\n|device 2 (a): name a is also device 1's
[[device]]\nname = "a"\ntarget = "mem"\nsize = "12Q"\n|device 1 (a): invalid value '12Q' for '--size
[[device]]\nname = "a"\nsize = "1M"\n|device 1 (a): key target is missing
[[device]]\nname = "a"\ntarget = "null"\nsize = \n|line 4
EOF
    expect_fail "$WORK/nope.toml: " ub apply "$WORK/nope.toml"
    [ "$(states)" = 0 ] || die "a bad file changed devices"
    [ "$(cat "$USERBLK_STATE_DIR/pool.managed" 2>/dev/null || true)" = "$managed" ] || die "a bad file changed the pool's names"
}

case_device_in_use_is_not_deleted() {
    needs_fuse
    pool <<EOF
[[device]]
name = "held"
target = "mem"
size = "4M"
frontend = "fuse"
loop = true

[[device]]
name = "free"
target = "mem"
size = "4M"
frontend = "fuse"
EOF
    ub apply "$POOL" >/dev/null
    local blk holder rc=0 out
    blk=$(field held block_device)
    sleep 60 <"$blk" &
    holder=$!
    wait_for 10 has_stdin "$holder" "$blk" || die "the holder did not open $blk"
    : >"$POOL"
    out=$(ub apply "$POOL" 2>&1) || rc=$?
    echo "$out"
    kill "$holder"; wait "$holder" 2>/dev/null || true
    [ "$rc" = 3 ] || die "a refused delete exits 3, not $rc"
    grep -q '^delete *held .*FAILED' <<<"$out" || die "the refusal is not reported"
    ! ub list --name free >/dev/null 2>&1 || die "apply stopped at the refusal: free still runs"
    [ "$(field held state)" = LIVE ] || die "the held device was taken away"
    # Released: the next run deletes it (it stays managed).
    wait_for 10 exited "$holder"
    empty_pool
}

case_killed_apply_converges_on_rerun() {
    needs_fuse
    local i pid out
    : >"$POOL"
    for i in 1 2 3 4; do
        printf '[[device]]\nname = "k%s"\ntarget = "mem"\nsize = "4M"\nfrontend = "fuse"\n\n' "$i" >>"$POOL"
    done
    "$USERBLK" apply "$POOL" >"$WORK/first.out" 2>&1 &
    pid=$!
    wait_for 30 some_states || die "apply added nothing"
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "note: apply was killed with $(states) of 4 devices made"
    out=$(ub apply "$POOL")
    echo "$out"
    [ "$(grep -c '^add \|^keep ' <<<"$out")" = 4 ] || die "the rerun did not converge: $out"
    [ "$(states)" = 4 ] || die "$(states) devices, not 4"
    for i in 1 2 3 4; do
        [ "$(field "k$i" state)" = LIVE ] || die "k$i is not live"
    done
    out=$(ub apply "$POOL")
    [ "$(grep -c '^keep ' <<<"$out")" = 4 ] || die "the third run is not a no-op: $out"
    empty_pool
}

plan 8
case_run add_from_empty_then_rerun_is_a_no_op case_add_from_empty_then_rerun_is_a_no_op
case_run removed_devices_go_others_stay case_removed_devices_go_others_stay
case_run grow_resizes_in_place case_grow_resizes_in_place
case_run changed_option_differs_until_recreate case_changed_option_differs_until_recreate
case_run dry_run_changes_nothing_json_parses case_dry_run_changes_nothing_json_parses
case_run bad_files_exit_2_and_change_nothing case_bad_files_exit_2_and_change_nothing
case_run device_in_use_is_not_deleted case_device_in_use_is_not_deleted
case_run killed_apply_converges_on_rerun case_killed_apply_converges_on_rerun
summary
