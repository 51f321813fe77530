#!/usr/bin/env bash
# Host suite for `userblk metrics`: devices served through FUSE (and FUSE +
# loop) on this machine, known I/O, the counters read back with --once and
# over --listen (TCP and a Unix socket), parsed by a small parser here (and
# by promtool or prometheus_client where installed); a killed daemon shows
# up=0, a deleted device is gone. Runs as root on any kernel with FUSE.
# Usage: bash tests/host/metrics.sh   (from the repository root; USERBLK overrides the binary)
# Beside other runs: USERBLK_STATE_DIR=DIR unshare -m --propagation private bash tests/host/metrics.sh
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

host_suite metrics
# Pids of the `metrics --listen` servers started (a file: cases run in subshells).
SERVERS=$WORK/servers

needs_host() {
    [ "$(id -u)" = 0 ] || skip "needs root"
    [ -e /dev/fuse ] || skip "no /dev/fuse"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Check the exposition text in FILE with a small parser: every line a
# comment or a sample, each family's TYPE before its samples and its
# samples together, histogram buckets cumulative and +Inf equal to _count.
check_text() { # check_text FILE
    python3 - "$1" <<'PY'
import re, sys
fams, order, last = {}, [], None
hist = {}
sample = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
text = open(sys.argv[1]).read()
assert text.endswith("\n"), "the text must end with a line feed"
for n, line in enumerate(text.splitlines(), 1):
    if line.startswith("# HELP "):
        continue
    if line.startswith("# TYPE "):
        _, _, name, kind = line.split(" ")
        assert name not in fams, f"line {n}: {name} declared twice"
        assert kind in ("counter", "gauge", "histogram"), line
        fams[name] = kind
        last = name
        continue
    m = sample.match(line)
    assert m, f"line {n}: not a sample: {line!r}"
    name, labels, value = m.groups()
    float(value)
    base = re.sub(r'_(bucket|sum|count)$', '', name) if fams.get(last) == "histogram" else name
    assert base == last, f"line {n}: {name} outside its family (in {last})"
    pairs = label.findall(labels or "")
    assert ",".join(f'{k}="{v}"' for k, v, _ in pairs) == (labels or ""), f"line {n}: bad labels {labels!r}"
    if name.endswith("_bucket"):
        d = dict((k, v) for k, v, _ in pairs)
        key = (base, tuple(sorted((k, v) for k, v in d.items() if k != "le")))
        prev = hist.get(key, (None, -1))[1]
        assert float(value) >= prev, f"line {n}: buckets not cumulative"
        hist[key] = (d["le"], float(value))
    elif name.endswith("_count") and fams.get(last) == "histogram":
        key = (base, tuple(sorted((k, v) for k, v, _ in pairs)))
        assert hist[key] == ("+Inf", float(value)), f"line {n}: +Inf bucket {hist[key]} != count {value}"
print(f"parsed: {len(fams)} families")
PY
}

# The value of the sample NAME in FILE whose labels include every K=V given
# (empty if there is none).
sample() { # sample FILE NAME [K=V...]
    python3 - "$@" <<'PY'
import re, sys
path, name, *want = sys.argv[1:]
want = [w.split("=", 1) for w in want]
for line in open(path):
    m = re.match(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line.rstrip("\n"))
    if not m or line.startswith("#") or m.group(1) != name:
        continue
    labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
    if all(labels.get(k) == v for k, v in want):
        print(m.group(3))
        break
PY
}

# Start `metrics --listen ADDR` in the background; wait until it answers.
start_server() { # start_server ADDR PROBE_URL [CURL_ARGS...]
    local addr=$1 url=$2; shift 2
    # The binary itself in the background, not `ub`: $! would be the
    # subshell running the function, and killing it would leave the server.
    "$USERBLK" metrics --listen "$addr" 2>"$WORK/server.err" &
    echo "$!" >>"$SERVERS"
    wait_for 10 curl -fsS -o /dev/null "$@" "$url" || { cat "$WORK/server.err"; die "metrics --listen $addr never answered"; }
}

stop_servers() {
    local p
    [ -s "$SERVERS" ] || return 0
    while read -r p; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done <"$SERVERS"
    : >"$SERVERS"
}

case_writes_are_counted() {
    needs_host
    local id file n=64 before after w0 w1 b0 b1 port
    read -r id file < <(add_served --frontend fuse mem --size 64M)
    ub metrics --once >"$WORK/before.txt"
    check_text "$WORK/before.txt"
    [ "$(sample "$WORK/before.txt" userblk_device_up id="$id")" = 1 ] || die "up is not 1"
    [ -n "$(sample "$WORK/before.txt" userblk_device_info id="$id" frontend=fuse target=mem block_device="$file")" ] \
        || die "no device_info for device $id"
    w0=$(sample "$WORK/before.txt" userblk_requests_total id="$id" op=write)
    b0=$(sample "$WORK/before.txt" userblk_bytes_total id="$id" op=write)
    dd if=/dev/urandom of="$file" bs=4K count=$n oflag=direct conv=notrunc status=none
    ub metrics --once >"$WORK/after.txt"
    check_text "$WORK/after.txt"
    w1=$(sample "$WORK/after.txt" userblk_requests_total id="$id" op=write)
    b1=$(sample "$WORK/after.txt" userblk_bytes_total id="$id" op=write)
    echo "note: writes $w0 -> $w1, bytes $b0 -> $b1"
    [ $((w1 - w0)) -ge $n ] || die "writes moved by $((w1 - w0)), not $n"
    [ $((b1 - b0)) -ge $((n * 4096)) ] || die "bytes moved by $((b1 - b0)), not $((n * 4096))"
    [ "$(sample "$WORK/after.txt" userblk_request_duration_seconds_count id="$id" op=write)" = "$w1" ] \
        || die "the write histogram does not count every write"
    [ "$(sample "$WORK/after.txt" userblk_errors_total id="$id" op=write)" = 0 ] || die "write errors counted"
    [ "$(sample "$WORK/after.txt" userblk_inflight_requests id="$id")" = 0 ] || die "requests in flight while idle"
    [ "$(sample "$WORK/after.txt" userblk_recoveries_total id="$id")" = 0 ] || die "recoveries of a new device"

    # The same over HTTP, with the format's content type.
    port=$(free_port)
    start_server "tcp:127.0.0.1:$port" "http://127.0.0.1:$port/metrics"
    curl -fsS -D "$WORK/headers" "http://127.0.0.1:$port/metrics" >"$WORK/http.txt"
    grep -qi '^content-type: text/plain; version=0.0.4' "$WORK/headers" || die "content type: $(cat "$WORK/headers")"
    check_text "$WORK/http.txt"
    [ "$(sample "$WORK/http.txt" userblk_requests_total id="$id" op=write)" -ge "$w1" ] || die "--listen shows fewer writes"
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/")" = 404 ] || die "/ is not 404"
    stop_servers
    del_served "$id"
}

case_loop_device_io_is_counted() {
    needs_host
    [ -e /dev/loop-control ] || modprobe loop 2>/dev/null || skip "no loop devices"
    local id blk n=32 w r
    read -r id blk < <(add_served --frontend fuse --loop mem --size 64M)
    dd if=/dev/urandom of="$blk" bs=4K count=$n oflag=direct conv=fsync status=none
    dd if="$blk" of=/dev/null bs=4K count=$n iflag=direct status=none
    ub metrics --once >"$WORK/loop.txt"
    check_text "$WORK/loop.txt"
    w=$(sample "$WORK/loop.txt" userblk_bytes_total id="$id" op=write)
    r=$(sample "$WORK/loop.txt" userblk_requests_total id="$id" op=read)
    echo "note: loop device: $(sample "$WORK/loop.txt" userblk_requests_total id="$id" op=write) writes of $w bytes, $r reads"
    # The loop device may merge or split what reaches the daemon: bytes, not requests.
    [ "$w" -ge $((n * 4096)) ] || die "write bytes $w < $((n * 4096))"
    [ "$(sample "$WORK/loop.txt" userblk_device_info id="$id" block_device="$blk")" = 1 ] || die "no device_info naming $blk"
    del_served "$id"
}

case_killed_then_deleted() {
    needs_host
    local id file pid
    read -r id file < <(add_served --frontend fuse mem --size 16M)
    dd if=/dev/zero of="$file" bs=4K count=8 oflag=direct conv=notrunc status=none
    pid=$(list_word "$id" 7)
    kill -9 "$pid"
    wait_for 5 exited "$pid" || die "daemon $pid still running"
    ub metrics --once >"$WORK/dead.txt"
    check_text "$WORK/dead.txt"
    [ "$(sample "$WORK/dead.txt" userblk_device_up id="$id")" = 0 ] || die "up is not 0 after kill -9"
    [ "$(sample "$WORK/dead.txt" userblk_requests_total id="$id" op=write)" -ge 8 ] || die "a dead daemon's counts are lost"
    ub del -n "$id"
    [ ! -e "$USERBLK_STATE_DIR/$id.metrics" ] || die "del left the counter file"
    ub metrics --once >"$WORK/gone.txt"
    ! grep -q "id=\"$id\"" "$WORK/gone.txt" || die "device $id still in the output after del"
}

case_unix_socket_and_bad_requests() {
    needs_host
    local sock=$WORK/metrics.sock id file code
    read -r id file < <(add_served --frontend fuse mem --size 16M)
    start_server "unix:$sock" http://localhost/metrics --unix-socket "$sock"
    curl -fsS --unix-socket "$sock" http://localhost/metrics >"$WORK/unix.txt"
    check_text "$WORK/unix.txt"
    [ "$(sample "$WORK/unix.txt" userblk_device_up id="$id")" = 1 ] || die "device $id not up over the socket"
    # Garbage, an oversized head and a POST: refused, and the server goes on.
    python3 - "$sock" <<'PY'
import socket, sys
def ask(data):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sys.argv[1])
    try:
        s.sendall(data)
    except OSError:
        pass
    out = b""
    while True:
        try:
            b = s.recv(65536)
        except OSError:
            break
        if not b:
            break
        out += b
    return out.split(b"\r\n", 1)[0].decode()
for data, want in [(b"NONSENSE\r\n\r\n", "400"), (b"GET /" + b"a" * 100000, "400"),
                   (b"POST /metrics HTTP/1.1\r\n\r\n", "405")]:
    line = ask(data)
    assert line.startswith("HTTP/1.1 " + want), (data[:20], line)
print("refused as expected")
PY
    # A client that connects and sends nothing does not block others.
    python3 -c 'import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); time.sleep(8)' "$sock" &
    local idle=$!
    sleep 0.5
    code=$(curl -s -m 3 -o /dev/null -w '%{http_code}' --unix-socket "$sock" http://localhost/metrics)
    kill "$idle" 2>/dev/null || true
    wait "$idle" 2>/dev/null || true
    [ "$code" = 200 ] || die "a silent client held the server (got '$code')"
    stop_servers
    # A stale socket is replaced; a live one is not taken over.
    start_server "unix:$sock" http://localhost/metrics --unix-socket "$sock"
    expect_fail "another server listens" ub metrics --listen "unix:$sock"
    stop_servers
    del_served "$id"
}

case_errors_are_one_clear_line() {
    expect_fail "--listen" ub metrics
    expect_fail "expected unix:PATH or tcp:HOST:PORT" ub metrics --listen nowhere
    expect_fail "cannot be used with" ub metrics --once --listen tcp:127.0.0.1:1
    local port
    port=$(free_port)
    python3 -c 'import socket,sys,time; s=socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(); time.sleep(10)' "$port" &
    local holder=$!
    sleep 0.5
    expect_fail "listening on tcp:127.0.0.1:$port" ub metrics --listen "tcp:127.0.0.1:$port"
    kill "$holder" 2>/dev/null || true
    wait "$holder" 2>/dev/null || true
    # No devices at all: the families, and no samples.
    USERBLK_STATE_DIR=$WORK/empty ub metrics --once >"$WORK/empty.txt"
    check_text "$WORK/empty.txt"
    ! grep -q '^userblk_' "$WORK/empty.txt" || die "samples without devices"
}

case_promtool_or_client_parses() {
    needs_host
    local id file
    read -r id file < <(add_served --frontend fuse mem --size 16M)
    dd if=/dev/zero of="$file" bs=4K count=4 oflag=direct conv=notrunc status=none
    ub metrics --once >"$WORK/check.txt"
    del_served "$id"
    if command -v promtool >/dev/null; then
        promtool check metrics <"$WORK/check.txt"
    # Debian's python3-prometheus-client belongs to /usr/bin/python3 (vm/setup.sh installs it).
    elif /usr/bin/python3 -c 'import prometheus_client' 2>/dev/null; then
        /usr/bin/python3 - "$WORK/check.txt" <<'PY'
import sys
from prometheus_client.parser import text_string_to_metric_families
fams = {f.name: f for f in text_string_to_metric_families(open(sys.argv[1]).read())}
assert fams["userblk_request_duration_seconds"].type == "histogram", fams.keys()
assert any(s.value >= 4 for s in fams["userblk_requests"].samples if s.labels.get("op") == "write")
print("prometheus_client parsed", len(fams), "families")
PY
    else
        [ "${CI:-}" != true ] || die "CI installs python3-prometheus-client (vm/setup.sh), but it is missing"
        skip "neither promtool (Debian: prometheus) nor python3 prometheus_client is installed"
    fi
}

cleanup_all() { stop_servers; del_own_devices; }
trap 'cleanup_all; rm -rf "$WORK"' EXIT

plan 6
case_run "writes counted: --once and --listen tcp" case_writes_are_counted
case_run "FUSE + loop: the loop device's I/O is counted" case_loop_device_io_is_counted
case_run "kill -9: up=0, counts kept; del: gone" case_killed_then_deleted
case_run "unix socket; bad requests refused, server goes on" case_unix_socket_and_bad_requests
case_run "bad arguments: one clear line" case_errors_are_one_clear_line
case_run "promtool / prometheus_client parse the text" case_promtool_or_client_parses
summary
