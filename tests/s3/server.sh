#!/usr/bin/env bash
# A local S3 server (s3s-fs) for the s3 target's tests and CI.
#
#   tests/s3/server.sh install            build+install s3s-fs (skipped if present)
#   tests/s3/server.sh path               print the binary's path
#   tests/s3/server.sh start DIR PORT     serve DIR on 127.0.0.1:PORT, print the pid
#   tests/s3/server.sh stop PID           stop a server started by `start`
#
# The server uses fixed test credentials (not secrets; loopback only):
#   access key  userblk-test-key     (S3S_ACCESS_KEY overrides)
#   secret key  userblk-test-secret  (S3S_SECRET_KEY overrides)
# Clients must use path-style requests (http://127.0.0.1:PORT/BUCKET/KEY):
# no --domain is given, so virtual-hosted style is off. Any region works;
# s3s checks the signature, not the region name.
#
# Buckets: s3s-fs maps bucket B to the directory DIR/B and object key K to the
# file DIR/B/K. A bucket is created either by `mkdir DIR/B` (what the tests do,
# no request needed) or by an S3 CreateBucket call (PUT /B), which does the
# same mkdir. Object metadata lives in hidden DIR/.bucket-*.json files.
#
# Install root: ${S3S_FS_ROOT:-/opt/s3s-fs}; the binary is $ROOT/bin/s3s-fs.
# The integration tests find it there, or at $S3S_FS if that is set.
set -euo pipefail

VERSION=0.14.1
ROOT=${S3S_FS_ROOT:-/opt/s3s-fs}
BIN=${S3S_FS:-$ROOT/bin/s3s-fs}
ACCESS_KEY=${S3S_ACCESS_KEY:-userblk-test-key}
SECRET_KEY=${S3S_SECRET_KEY:-userblk-test-secret}

usage() {
    sed -n '2,8p' "$0" >&2
    exit 2
}

installed_version_ok() {
    [[ -x $BIN ]] && "$BIN" --version 2>/dev/null | grep -q " $VERSION\$"
}

cmd_install() {
    if installed_version_ok; then
        echo "s3s-fs $VERSION already installed at $BIN"
        return 0
    fi
    # -j 1 and nice: the build machines are small and shared with other jobs.
    nice -n 19 cargo install --locked --quiet s3s-fs --version "$VERSION" \
        --features binary --root "$ROOT" -j "${CARGO_BUILD_JOBS:-1}"
    installed_version_ok || { echo "s3s-fs install failed: $BIN not usable" >&2; exit 1; }
    echo "s3s-fs $VERSION installed at $BIN"
}

# Wait until something accepts TCP connections on 127.0.0.1:$1 (bash's
# /dev/tcp, so no nc/curl needed).
wait_port() {
    local port=$1 pid=$2 i
    for ((i = 0; i < 100; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

cmd_start() {
    local dir=${1:?DIR missing} port=${2:?PORT missing}
    [[ -x $BIN ]] || { echo "s3s-fs not installed (run $0 install)" >&2; exit 1; }
    mkdir -p "$dir"
    local log=${S3S_LOG:-$dir.log}
    # setsid: the server must not die with (or get signals meant for) the
    # shell that started it; `stop` ends it by pid.
    setsid "$BIN" --host 127.0.0.1 --port "$port" \
        --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" \
        "$dir" </dev/null >"$log" 2>&1 &
    local pid=$!
    if ! wait_port "$port" "$pid"; then
        echo "s3s-fs did not start on port $port; log $log:" >&2
        tail -n 20 "$log" >&2 || true
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    echo "$pid"
}

cmd_stop() {
    local pid=${1:?PID missing} i
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

case ${1:-} in
    install) cmd_install ;;
    path) echo "$BIN" ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    *) usage ;;
esac
