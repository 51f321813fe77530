#!/usr/bin/env bash
# Host suite for `userblk copy`, against qemu-img, nbdkit, cmp and du on
# this machine (no ublk, no devices of userblk's own):
#   - raw -> qcow2 -> raw round trips are byte-identical (cmp, qemu-img
#     compare), and neither copy allocates the source's holes or its
#     blocks of zeroes (qemu-img map, du);
#   - an existing destination full of garbage (raw, qcow2, a loop block
#     device) gets zeroes where the source has holes;
#   - a destination smaller than the source, bad endpoints and missing
#     files are refused with a clear message, touching nothing;
#   - --json counts the bytes of a file with a known layout exactly;
#   - a copy restarted over a half-copied destination, or stopped with
#     SIGINT and then restarted or resumed (--resume), ends identical;
#   - nbd:// endpoints: into `nbdkit memory` and back.
# Runs as root (loop devices); everything lives in a private directory.
# Usage: bash tests/host/copy.sh   (from the repository root; USERBLK overrides the binary)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }

WORK=$(mktemp -d /var/tmp/userblk-copy.XXXXXX)
export USERBLK_STATE_DIR=$WORK/state
SERVER_PIDS=()
LOOPS=()
MIB=1048576

needs() { local t; for t in "$@"; do command -v "$t" >/dev/null || skip "$t is not installed"; done; }

# A 48 MiB sparse source: random data runs, 2 MiB of written zeroes
# (allocated, but all zero), holes, and a few sectors near the end.
# DATA is the bytes of random data (whole 4 KiB blocks).
SRC=$WORK/src.raw
DATA=$(( (6 << 20) + 300 * 4096 + (2 << 20) + 4096 ))
make_source() {
    [ -s "$SRC" ] && return 0
    truncate -s 48M "$SRC"
    dd if=/dev/urandom of="$SRC" bs=1M count=6 conv=notrunc status=none
    dd if=/dev/zero of="$SRC" bs=1M count=2 seek=20 conv=notrunc status=none
    dd if=/dev/urandom of="$SRC" bs=4k count=300 seek=3000 conv=notrunc status=none
    dd if=/dev/urandom of="$SRC" bs=1M count=2 seek=40 conv=notrunc status=none
    dd if=/dev/urandom of="$SRC" bs=512 count=8 seek=$(( (47 << 20) / 512 + 8 )) conv=notrunc status=none
}

# Bytes qemu-img maps as data in IMAGE.
mapped_data() {
    qemu-img map --output=json "$1" | python3 -c '
import json, sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))'
}

json_field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# Allocated bytes of FILE.
allocated() { echo $(( $(stat -c %b "$1") * $(stat -c %B "$1") )); }

start_nbdkit() { # start_nbdkit SOCK ARGS...: nbdkit in the background
    local sock=$1; shift
    nbdkit -f --unix "$sock" "$@" >"$WORK/nbdkit.log" 2>&1 &
    SERVER_PIDS+=($!)
    wait_for 10 nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 \
        || die "nbdkit did not start: $(cat "$WORK/nbdkit.log")"
}

case_round_trip_is_identical() {
    needs qemu-img cmp
    make_source
    rm -f "$WORK/rt.qcow2" "$WORK/rt.raw"
    ub copy "$SRC" "$WORK/rt.qcow2"
    qemu-img info "$WORK/rt.qcow2" | grep -q "file format: qcow2" || die "a .qcow2 destination is not qcow2"
    qemu-img check "$WORK/rt.qcow2" >/dev/null || die "qemu-img check fails on the copy"
    qemu-img compare -f raw -F qcow2 "$SRC" "$WORK/rt.qcow2" || die "qemu-img compare: raw and qcow2 differ"
    ub copy "$WORK/rt.qcow2" "$WORK/rt.raw"
    cmp "$SRC" "$WORK/rt.raw" || die "the round trip changed bytes"
    [ "$(stat -c %s "$WORK/rt.raw")" = $((48 << 20)) ] || die "wrong size $(stat -c %s "$WORK/rt.raw")"
    # Explicit formats give the same bytes.
    rm -f "$WORK/rt2.raw"
    ub copy "qcow2:$WORK/rt.qcow2" "raw:$WORK/rt2.raw" >/dev/null
    cmp "$SRC" "$WORK/rt2.raw" || die "qcow2: -> raw: differs"
}

case_holes_are_not_allocated() {
    needs qemu-img python3
    make_source
    rm -f "$WORK/h.qcow2" "$WORK/h.raw"
    ub copy "$SRC" "$WORK/h.qcow2" >/dev/null
    local mapped
    mapped=$(mapped_data "$WORK/h.qcow2")
    echo "note: qcow2: $mapped bytes mapped as data for $DATA bytes of data ($(qemu-img check "$WORK/h.qcow2" | grep -o '[0-9/]* = [0-9.]*% allocated'))"
    # 64 KiB clusters: the runs and the tail sectors round up to a few clusters.
    [ "$mapped" -ge "$DATA" ] || die "less mapped than there is data"
    [ "$mapped" -le $((DATA + 8 * 65536)) ] || die "holes or zero blocks were allocated: $mapped bytes"
    ub copy "$WORK/h.qcow2" "$WORK/h.raw" >/dev/null
    local alloc
    alloc=$(allocated "$WORK/h.raw")
    echo "note: raw: du $alloc bytes, apparent $(stat -c %s "$WORK/h.raw")"
    [ "$alloc" -le $((DATA + 64 * 1024)) ] || die "the raw copy is not sparse: $alloc bytes allocated"
    [ "$alloc" -ge $((DATA - 64 * 1024)) ] || die "the raw copy lost data: $alloc bytes allocated"
}

case_existing_destination_gets_zeroes() {
    needs qemu-img cmp
    make_source
    # Raw, larger than the source: what is past the source's end stays.
    dd if=/dev/urandom of="$WORK/g.raw" bs=1M count=50 status=none
    tail -c $((2 << 20)) "$WORK/g.raw" >"$WORK/g.tail"
    local out
    out=$(ub copy "$SRC" "$WORK/g.raw" --json)
    echo "$out"
    cmp -n $((48 << 20)) "$SRC" "$WORK/g.raw" || die "garbage left in the source's holes"
    tail -c $((2 << 20)) "$WORK/g.raw" | cmp - "$WORK/g.tail" || die "bytes past the source's end changed"
    [ "$(json_field "$out" bytes_zeroed)" = "$(json_field "$out" bytes_skipped)" ] \
        || die "every skipped byte had garbage and needed zeroing: $out"
    # A qcow2 image full of data.
    qemu-img convert -q -f raw -O qcow2 "$WORK/g.tail" "$WORK/g0.qcow2"
    rm -f "$WORK/g.qcow2"
    qemu-img create -q -f qcow2 "$WORK/g.qcow2" 48M
    qemu-io -f qcow2 -c "write -P 0x5a 0 48M" "$WORK/g.qcow2" >/dev/null
    ub copy "$SRC" "$WORK/g.qcow2" >/dev/null
    qemu-img compare -f raw -F qcow2 "$SRC" "$WORK/g.qcow2" || die "the qcow2 destination kept garbage"
    qemu-img check "$WORK/g.qcow2" >/dev/null || die "qemu-img check fails"
    # A block device (a loop device over a file of garbage).
    [ -e /dev/loop-control ] || { echo "note: no loop devices: block device part not run"; return 0; }
    dd if=/dev/urandom of="$WORK/g.loopfile" bs=1M count=48 status=none
    local loop
    loop=$(losetup -f --show "$WORK/g.loopfile") || die "losetup failed"
    LOOPS+=("$loop")
    ub copy "$SRC" "$loop" >/dev/null
    cmp "$SRC" "$loop" || die "$loop: garbage left in the source's holes"
    rm -f "$WORK/from-loop.raw"
    ub copy "$loop" "$WORK/from-loop.raw" >/dev/null
    cmp "$SRC" "$WORK/from-loop.raw" || die "copying from $loop changed bytes"
    losetup -d "$loop"
    echo "note: block device $loop as source and destination"
}

case_small_destination_refused() {
    make_source
    truncate -s 1M "$WORK/small.raw"
    local before
    before=$(sha256sum <"$WORK/small.raw")
    expect_fail "smaller than the source" ub copy "$SRC" "$WORK/small.raw"
    [ "$(sha256sum <"$WORK/small.raw")" = "$before" ] || die "the small destination was written"
    qemu-img create -q -f qcow2 "$WORK/small.qcow2" 1M
    expect_fail "smaller than the source" ub copy "$SRC" "$WORK/small.qcow2"
    : >"$WORK/empty.raw"
    expect_fail "(0 bytes) is smaller" ub copy "$SRC" "$WORK/empty.raw"
}

# Exit status 2 and the message, for argument errors.
expect_usage_error() { # expect_usage_error PHRASE ARGS...
    local phrase=$1 rc=0 out; shift
    out=$(ub "$@" 2>&1) || rc=$?
    echo "\$ userblk $* -> exit $rc: $out"
    [ "$rc" = 2 ] || die "expected exit 2, got $rc"
    grep -qF -- "$phrase" <<<"$out" || die "no '$phrase' in: $out"
}

case_bad_endpoints_refused() {
    make_source
    expect_usage_error "unknown scheme 'http'" copy "$SRC" http://example.com/disk
    expect_usage_error "nbd+unix:///EXPORT?socket=PATH" copy tape:0 "$WORK/x.raw"
    expect_usage_error "multiple of 512" copy null:1000 "$WORK/x.raw"
    expect_usage_error "no path after" copy raw: "$WORK/x.raw"
    expect_fail "No such file" ub copy "$WORK/missing.raw" "$WORK/x.raw"
    # s3 ends are checked by tests/s3/suite.sh; here, what needs no server.
    expect_fail "unknown option 'colour'" ub copy "s3://bucket/disk?colour=red" "$WORK/x.raw"
    expect_fail "no S3 credentials" env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY \
        AWS_SHARED_CREDENTIALS_FILE=/nonexistent "$USERBLK" copy "$SRC" s3://bucket/disk
    [ ! -e "$WORK/x.raw" ] || die "a failed copy from s3 created its destination"
    expect_fail "cannot connect" ub copy "nbd+unix:///?socket=$WORK/nobody.sock" "$WORK/x.raw"
    expect_fail "same file" ub copy "$SRC" "raw:$SRC"
    head -c 1000 "$SRC" >"$WORK/odd.raw"
    expect_fail "not a multiple of 512" ub copy "$WORK/odd.raw" "$WORK/x.raw"
    [ ! -e "$WORK/x.raw" ] || die "a failed copy left a destination behind"
}

case_json_counts_a_known_layout() {
    # 16 MiB: 64 KiB of data at 1 MiB, 1 MiB at 8 MiB, 4 MiB of written
    # zeroes at 12 MiB, holes elsewhere.
    local f=$WORK/known.raw out
    rm -f "$f" "$WORK/known.qcow2"
    truncate -s 16M "$f"
    dd if=/dev/urandom of="$f" bs=64k count=1 seek=16 conv=notrunc status=none
    dd if=/dev/urandom of="$f" bs=1M count=1 seek=8 conv=notrunc status=none
    dd if=/dev/zero of="$f" bs=1M count=4 seek=12 conv=notrunc status=none
    out=$(ub copy "$f" "$WORK/known.qcow2" --json)
    echo "$out"
    [ "$(json_field "$out" bytes_total)" = $((16 << 20)) ] || die "bytes_total"
    [ "$(json_field "$out" bytes_data)" = $(( (1 << 20) + 65536 )) ] || die "bytes_data"
    [ "$(json_field "$out" bytes_skipped)" = $(( (15 << 20) - 65536 )) ] || die "bytes_skipped"
    [ "$(json_field "$out" bytes_zeroed)" = 0 ] || die "bytes_zeroed on a new image"
    [ "$(json_field "$out" complete)" = True ] || die "complete"
    python3 -c 'import json,sys; s=json.loads(sys.argv[1])["seconds"]; assert 0 < s < 60, s' "$out" || die "seconds"
    # The text summary: to a new file, holes are skipped; back over the
    # source, its 4 MiB of written zeroes are zeroed (punched) instead.
    rm -f "$WORK/known-back.raw"
    out=$(ub copy "$WORK/known.qcow2" "$WORK/known-back.raw" 2>&1)
    echo "$out"
    grep -qE '^copied 16 MiB in [0-9.]+ s \([0-9.]+ [KMG]?i?B/s\): 1\.1 MiB of data, 15 MiB of holes skipped$' <<<"$out" \
        || die "summary line: $out"
    cmp "$f" "$WORK/known-back.raw" || die "the copy back differs"
    out=$(ub copy "$WORK/known.qcow2" "$f" 2>&1)
    echo "$out"
    grep -qF "15 MiB of holes (4.0 MiB zeroed on the destination)" <<<"$out" || die "summary line: $out"
    cmp "$f" "$WORK/known-back.raw" || die "the copy over the source differs"
    # Nothing with --quiet.
    out=$(ub copy "$WORK/known.qcow2" "$WORK/known-back.raw" --quiet 2>&1)
    [ -z "$out" ] || die "--quiet printed: $out"
    # --progress on a pipe: plain lines on stderr, no escape codes.
    out=$(ub copy "$WORK/known.qcow2" "$WORK/known-back.raw" --progress 2>&1 >/dev/null)
    echo "$out"
    grep -q "of 16.00 MiB" <<<"$out" || die "no progress line: $out"
    ! grep -q $'\e' <<<"$out" || die "escape codes in plain progress output"
}

case_restart_over_half_copied_destination() {
    needs qemu-img cmp
    make_source
    # Raw: the first half copied, the rest garbage.
    head -c $((24 << 20)) "$SRC" >"$WORK/half.raw"
    dd if=/dev/urandom bs=1M count=24 status=none >>"$WORK/half.raw"
    ub copy "$SRC" "$WORK/half.raw" >/dev/null
    cmp "$SRC" "$WORK/half.raw" || die "restarting over a half-copied raw file"
    # qcow2: a copy of another source, then the real one twice.
    rm -f "$WORK/half.qcow2"
    dd if=/dev/urandom of="$WORK/other.raw" bs=1M count=48 status=none
    ub copy "$WORK/other.raw" "$WORK/half.qcow2" >/dev/null
    ub copy "$SRC" "$WORK/half.qcow2" >/dev/null
    ub copy "$SRC" "$WORK/half.qcow2" >/dev/null
    qemu-img compare -f raw -F qcow2 "$SRC" "$WORK/half.qcow2" || die "restarting over a qcow2 image"
    qemu-img check "$WORK/half.qcow2" >/dev/null || die "qemu-img check fails"
}

# Copy from a slow NBD source into DST with ARGS, and SIGINT it after a
# moment; the copy must stop with exit 1 and say it is partial.
interrupted_copy() { # interrupted_copy URI DST ARGS...
    local uri=$1 dst=$2 rc=0 pid; shift 2
    # The binary itself, not the `ub` function: the signal must reach it.
    "$USERBLK" copy "$uri" "$dst" "$@" >"$WORK/int.out" 2>&1 &
    pid=$!
    sleep 1.5
    kill -INT "$pid"
    wait "$pid" || rc=$?
    cat "$WORK/int.out"
    [ "$rc" = 1 ] || die "an interrupted copy exited $rc"
    grep -q "^interrupted after" "$WORK/int.out" || die "no partial summary"
    grep -q "only partly copied" "$WORK/int.out" || die "no error line"
}

case_sigint_then_restart_or_resume() {
    needs nbdkit nbdinfo qemu-img cmp
    dd if=/dev/urandom of="$WORK/slow.raw" bs=1M count=160 status=none
    start_nbdkit "$WORK/slow.sock" --filter=delay file "$WORK/slow.raw" rdelay=100ms
    local uri="nbd+unix:///?socket=$WORK/slow.sock" out
    # Stopped, then restarted (no --resume).
    rm -f "$WORK/i1.qcow2"
    interrupted_copy "$uri" "$WORK/i1.qcow2"
    qemu-img check "$WORK/i1.qcow2" >/dev/null || die "a stopped copy left a broken image"
    ub copy "$uri" "$WORK/i1.qcow2" >/dev/null
    qemu-img compare -f raw -F qcow2 "$WORK/slow.raw" "$WORK/i1.qcow2" || die "restarted copy differs"
    # Stopped, then resumed from the checkpoint.
    rm -f "$WORK/i2.raw" "$WORK/i2.raw.userblk-copy"
    interrupted_copy "$uri" "$WORK/i2.raw" --resume
    [ -s "$WORK/i2.raw.userblk-copy" ] || die "no checkpoint after the stop"
    cat "$WORK/i2.raw.userblk-copy"
    out=$(ub copy "$uri" "$WORK/i2.raw" --resume --json 2>"$WORK/resume.err")
    cat "$WORK/resume.err"
    echo "$out"
    [ "$(json_field "$out" bytes_resumed)" -gt 0 ] || die "did not resume"
    [ "$(json_field "$out" complete)" = True ] || die "not complete"
    grep -q "resuming at offset" "$WORK/resume.err" || die "no resume note"
    cmp "$WORK/slow.raw" "$WORK/i2.raw" || die "resumed copy differs"
    [ ! -e "$WORK/i2.raw.userblk-copy" ] || die "checkpoint left after a complete copy"
    echo "note: resumed at $(json_field "$out" bytes_resumed) of $((160 << 20)) bytes"
    # A checkpoint of another copy is refused, not trusted.
    echo '{"source":"null:1M","destination":"x","size":1,"offset":0}' >"$WORK/i2.raw.userblk-copy"
    expect_fail "another copy" ub copy "$uri" "$WORK/i2.raw" --resume
}

case_nbd_endpoints() {
    needs nbdkit nbdinfo qemu-img cmp
    make_source
    start_nbdkit "$WORK/mem.sock" memory 48M
    local uri="nbd+unix:///?socket=$WORK/mem.sock" out read pid
    ub copy "$SRC" "$uri"
    qemu-img compare -f raw -F raw "$SRC" "$uri" || die "nbdkit memory differs from the source"
    rm -f "$WORK/from-nbd.qcow2"
    out=$(ub copy "$uri" "$WORK/from-nbd.qcow2" --json)
    echo "$out"
    qemu-img compare -f raw -F qcow2 "$SRC" "$WORK/from-nbd.qcow2" || die "nbd -> qcow2 differs"
    [ "$(json_field "$out" bytes_data)" = "$DATA" ] || die "bytes_data from nbd"
    # Holes come from NBD block status: a copy reads the source's data
    # (~11 MiB, with the 2 MiB of written zeroes), not all 48 MiB. nbdkit's
    # stats filter counts the bytes read.
    start_nbdkit "$WORK/file.sock" --filter=stats file "$SRC" statsfile="$WORK/stats.txt"
    pid=${SERVER_PIDS[-1]}
    rm -f "$WORK/from-nbd.raw"
    ub copy "nbd+unix:///?socket=$WORK/file.sock" "$WORK/from-nbd.raw"
    cmp "$SRC" "$WORK/from-nbd.raw" || die "nbd (file) -> raw differs"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    read=$(python3 -c '
import re, sys
units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
for line in open(sys.argv[1]):
    m = re.match(r"read: \d+ ops, [\d.]+ s, ([\d.]+) (\w+)", line)
    if m:
        print(int(float(m.group(1)) * units[m.group(2)]))
        break
else:
    print(-1)' "$WORK/stats.txt")
    echo "read from nbdkit: $read bytes"
    [ "$read" -ge 0 ] && [ "$read" -lt $((16 << 20)) ] \
        || die "the copy read $read bytes from nbdkit: holes were read"
    start_nbdkit "$WORK/small.sock" memory 1M
    expect_fail "smaller than the source" ub copy "$SRC" "nbd+unix:///?socket=$WORK/small.sock"
}

cleanup() {
    local p l
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || true; done
    for p in "${SERVER_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
cleanup_devices() { :; }
trap 'cleanup; rm -rf "$WORK"' EXIT

plan 9
case_run "copy: raw -> qcow2 -> raw is byte-identical" case_round_trip_is_identical
case_run "copy: holes and zero blocks are not allocated" case_holes_are_not_allocated
case_run "copy: existing destinations get zeroes in holes" case_existing_destination_gets_zeroes
case_run "copy: a smaller destination is refused" case_small_destination_refused
case_run "copy: bad endpoints and missing files refused" case_bad_endpoints_refused
case_run "copy: --json counts a known layout" case_json_counts_a_known_layout
case_run "copy: restart over a half-copied destination" case_restart_over_half_copied_destination
case_run "copy: SIGINT, then restart or --resume" case_sigint_then_restart_or_resume
case_run "copy: nbd:// endpoints (nbdkit memory)" case_nbd_endpoints
summary
