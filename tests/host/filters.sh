#!/usr/bin/env bash
# Host suite for filters (--filter): stacks served through the FUSE and NBD
# frontends on this machine, checked with dd, curl, nbdinfo and the
# daemon's own `stats`. Runs as root; everything it starts lives in a
# private state directory and is deleted by id (never `del -a`).
# Usage: bash tests/host/filters.sh   (from the repository root; USERBLK overrides the binary)
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

host_suite filters

# ---- helpers ------------------------------------------------------------------

needs_fuse() {
    [ "$(id -u)" = 0 ] || skip "needs root"
    [ -e /dev/fuse ] || skip "no /dev/fuse"
    needs python3 dd
}

# Delete one device of ours and check its daemon and stats snapshot are gone.
del_filtered() {
    local id=$1 pid
    pid=$(list_word "$id" 7)
    del_served "$id"
    [ ! -e "$USERBLK_STATE_DIR/stats-$pid.json" ] || die "stats snapshot left behind"
}

# Field of `stats -n ID --json`: stats_field ID 'ops["read"]["count"]'.
stats_field() {
    ub stats -n "$1" --json | python3 -c "import json,sys; d=json.load(sys.stdin); print(d$2)"
}

# Wait (up to 3 s: snapshots are written every second) until the stats
# field reaches at least WANT.
wait_stats() { # wait_stats ID FIELD WANT
    wait_for 3 sh -c "[ \"\$($USERBLK stats -n $1 --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d$2)')\" -ge $3 ]"
}

now_ms() { echo $(( ${EPOCHREALTIME/./} / 1000 )); }

# ---- cases --------------------------------------------------------------------

case_delay_and_stats() {
    needs_fuse
    local id file t0 took
    read -r id file < <(add_served mem --size 64M --frontend fuse --filter stats --filter delay:read=20ms)
    ub list -n "$id" | grep -q "filters stats:file=.* delay:read=20ms" || die "list does not show the stack"
    t0=$(now_ms)
    dd if="$file" of=/dev/null bs=4k count=10 iflag=direct status=none
    took=$(( $(now_ms) - t0 ))
    echo "note: 10 reads with a 20 ms delay took ${took} ms"
    [ "$took" -ge 200 ] || die "10 delayed reads took only ${took} ms"
    dd if=/dev/urandom of="$file" bs=4k count=5 oflag=direct conv=notrunc status=none
    wait_stats "$id" '["ops"]["write"]["count"]' 5 || die "stats never showed the writes"
    [ "$(stats_field "$id" '["ops"]["read"]["count"]')" = 10 ] || die "read count is not 10"
    [ "$(stats_field "$id" '["ops"]["read"]["bytes"]')" = 40960 ] || die "read bytes"
    [ "$(stats_field "$id" '["ops"]["write"]["count"]')" = 5 ] || die "write count is not 5"
    [ "$(stats_field "$id" '["ops"]["read"]["latency_us"]["p50"]')" -ge 20000 ] || die "read p50 under the delay"
    [ "$(stats_field "$id" '["ops"]["write"]["latency_us"]["max"]')" -lt 20000 ] || die "writes were delayed"
    [ "$(stats_field "$id" '["live"]')" = True ] || die "stats does not say the daemon is live"
    ub stats -n "$id" | grep -qE '^read +10 +40K +0 ' || die "text stats: $(ub stats -n "$id")"
    del_filtered "$id"
}

case_error_gives_eio() {
    needs_fuse
    local id file
    read -r id file < <(add_served mem --size 64M --frontend fuse --filter error:ops=read,range=1M-2M)
    dd if="$file" of=/dev/null bs=4k count=1 skip=255 iflag=direct status=none || die "read before the range failed"
    expect_fail "Input/output error" dd if="$file" of=/dev/null bs=4k count=1 skip=256 iflag=direct
    expect_fail "Input/output error" dd if="$file" of=/dev/null bs=4k count=1 skip=511 iflag=direct
    dd if="$file" of=/dev/null bs=4k count=1 skip=512 iflag=direct status=none || die "read after the range failed"
    # Writes are not in ops: they go through, in the range too.
    dd if=/dev/zero of="$file" bs=4k count=1 seek=300 oflag=direct conv=notrunc status=none || die "write failed"
    del_filtered "$id"
}

case_error_trigger_file() {
    needs_fuse
    local id file trigger=$WORK/fail-now
    rm -f "$trigger"
    read -r id file < <(add_served mem --size 16M --frontend fuse --filter "error:errno=ENOSPC,file=$trigger")
    dd if=/dev/zero of="$file" bs=4k count=1 oflag=direct conv=notrunc status=none || die "write failed with no trigger"
    touch "$trigger"
    expect_fail "No space left on device" dd if=/dev/zero of="$file" bs=4k count=1 oflag=direct conv=notrunc
    rm "$trigger"
    dd if=/dev/zero of="$file" bs=4k count=1 oflag=direct conv=notrunc status=none || die "write failed after the trigger went"
    del_filtered "$id"
}

case_readonly() {
    needs_fuse
    needs blockdev losetup
    local id blk
    read -r id blk < <(add_served mem --size 16M --frontend fuse --loop --filter readonly)
    [ -b "$blk" ] || die "$blk is not a block device"
    [ "$(blockdev --getro "$blk")" = 1 ] || die "$blk is not read-only"
    dd if="$blk" of=/dev/null bs=4k count=4 iflag=direct status=none || die "reading a read-only device failed"
    expect_fail "not permitted\|read-only" dd if=/dev/zero of="$blk" bs=4k count=1 oflag=direct
    ub list -n "$id" --json | python3 -c 'import json,sys; d=json.load(sys.stdin)[0]; assert d["filters"] == ["readonly"], d' \
        || die "list --json lacks the filter"
    del_filtered "$id"
}

case_log_lines() {
    needs_fuse
    local id file log=$WORK/requests.jsonl
    rm -f "$log"
    read -r id file < <(add_served null --size 16M --frontend fuse --filter "log:file=$log")
    dd if=/dev/zero of="$file" bs=4k count=3 seek=2 oflag=direct conv=notrunc status=none
    dd if="$file" of=/dev/null bs=8k count=1 iflag=direct status=none
    del_filtered "$id"  # the log is flushed when the daemon exits
    LOG=$log python3 - <<'EOF' || die "bad request log: $(head -5 "$log")"
import json, os
lines = [json.loads(l) for l in open(os.environ["LOG"])]
writes = [l for l in lines if l["op"] == "write"]
reads = [l for l in lines if l["op"] == "read" and l["len"] == 8192]
assert [(w["offset"], w["len"], w["result"]) for w in writes] == [(8192, 4096, 4096), (12288, 4096, 4096), (16384, 4096, 4096)], writes
assert reads and reads[0]["offset"] == 0 and reads[0]["result"] == 8192, lines
for l in lines:
    assert set(l) >= {"ts", "op", "offset", "len", "flags", "latency_us", "result"}, l
EOF
}

case_prometheus() {
    needs_fuse
    needs curl
    local id file port metrics
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    read -r id file < <(add_served mem --size 16M --frontend fuse --filter "stats:prometheus=127.0.0.1:$port")
    dd if="$file" of=/dev/null bs=4k count=7 iflag=direct status=none
    metrics=$(curl -sf "http://127.0.0.1:$port/metrics") || die "no metrics on port $port"
    grep -q '^userblk_requests_total{op="read"} 7$' <<<"$metrics" || die "read count: $(grep requests_total <<<"$metrics")"
    grep -q '^userblk_request_duration_seconds_bucket{op="read",le="+Inf"} 7$' <<<"$metrics" || die "histogram"
    # Without file=, the outermost stats filter also writes the snapshot `stats` reads.
    ub stats -n "$id" >/dev/null || die "userblk stats failed"
    del_filtered "$id"
    ! curl -sf "http://127.0.0.1:$port/metrics" >/dev/null || die "metrics still served after del"
}

case_rate_limit() {
    needs_fuse
    local id file t0 took
    read -r id file < <(add_served mem --size 16M --frontend fuse --filter rate:iops=50)
    t0=$(now_ms)
    dd if="$file" of=/dev/null bs=4k count=26 iflag=direct status=none
    took=$(( $(now_ms) - t0 ))
    echo "note: 26 reads at 50 IOPS took ${took} ms"
    [ "$took" -ge 450 ] && [ "$took" -lt 1500 ] || die "26 reads at 50 IOPS took ${took} ms"
    del_filtered "$id"
}

case_nbd_offset_truncate() {
    needs nbdinfo python3
    local id uri sock=$WORK/t.sock
    read -r id uri < <(add_served null --size 64M --listen "unix:$sock" --filter truncate:size=100M)
    [ "$(nbdinfo --size "$uri")" = $((100 << 20)) ] || die "truncate: size $(nbdinfo --size "$uri")"
    del_filtered "$id"
    read -r id uri < <(add_served null --size 64M --listen "unix:$sock" --filter offset:offset=1M,size=16M --filter readonly)
    [ "$(nbdinfo --size "$uri")" = $((16 << 20)) ] || die "offset: size $(nbdinfo --size "$uri")"
    nbdinfo --json "$uri" | python3 -c 'import json,sys; e=json.load(sys.stdin)["exports"][0]; assert e["is_read_only"], e' \
        || die "readonly not advertised over NBD"
    del_filtered "$id"
}

case_bad_specs() {
    needs_fuse
    expect_fail "unknown filter 'nope'" ub add mem --size 16M --frontend fuse --filter nope
    expect_fail "read=5: '5' has no unit" ub add mem --size 16M --frontend fuse --filter delay:read=5
    expect_fail "unknown option 'sise'" ub add mem --size 16M --frontend fuse --filter truncate:sise=1G
    expect_fail "filter log: opening /nonexistent/dir/x.log" ub add mem --size 16M --frontend fuse \
        --filter log:file=/nonexistent/dir/x.log
    expect_fail "offset 1073741824 is not inside the target" ub add mem --size 16M --frontend fuse \
        --filter offset:offset=1G
    expect_fail "no device with id 4242" ub stats -n 4242
    [ -z "$(ls "$USERBLK_STATE_DIR"/*.json 2>/dev/null)" ] || die "state left behind: $(ls "$USERBLK_STATE_DIR")"
}

# ---- run ----------------------------------------------------------------------

# Only our own devices: the ids in our private state directory.
cleanup_devices() {
    del_own_devices
}
trap 'cleanup_devices; rm -rf "$WORK"' EXIT

plan 9
case_run "delay + stats: reads wait, stats counts them" case_delay_and_stats
case_run "error: EIO in a byte range only" case_error_gives_eio
case_run "error: a trigger file turns ENOSPC on and off" case_error_trigger_file
case_run "readonly: a read-only loop device" case_readonly
case_run "log: JSON lines for each request" case_log_lines
case_run "stats: Prometheus metrics over HTTP" case_prometheus
case_run "rate: IOPS limit under dd" case_rate_limit
case_run "NBD: truncate and offset sizes, readonly" case_nbd_offset_truncate
case_run "bad filter specs: clear errors" case_bad_specs
summary
