# What the s3 suites share (tests/s3/suite.sh, tests/s3/clones.sh); sourced
# after vm/suite/lib.sh with the suite's arguments:
#   . tests/s3/lib.sh "$@"      # --frontend fuse|ublk, --server s3s-fs|rgw
# Sets FRONTEND, KIND, WORK (a private directory, deleted at exit with the
# suite's devices and server), EP, FE (add's frontend and lease options),
# and defines the server, the S3 API (s3), add_s3 and objects.
FRONTEND=fuse
KIND=s3s-fs
while [ $# -gt 0 ]; do
    case $1 in
        --frontend) FRONTEND=$2; shift 2 ;;
        --server) KIND=$2; shift 2 ;;
        *) echo "unknown argument $1"; exit 2 ;;
    esac
done
case $FRONTEND in fuse|ublk) ;; *) echo "--frontend fuse or ublk"; exit 2 ;; esac
case $KIND in s3s-fs|rgw) ;; *) echo "--server s3s-fs or rgw"; exit 2 ;; esac

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }

WORK=$(mktemp -d "/var/tmp/userblk-${S3_SUITE:-s3}.XXXXXX")
export USERBLK_STATE_DIR=$WORK/state
MNT=$WORK/mnt
mkdir -p "$MNT"
SERVER=tests/s3/server.sh
DATA=$WORK/s3
PORT=$((20000 + RANDOM % 20000))
EP=http://127.0.0.1:$PORT
export AWS_ACCESS_KEY_ID=userblk-test-key AWS_SECRET_ACCESS_KEY=userblk-test-secret
unset AWS_ENDPOINT_URL AWS_REGION AWS_SESSION_TOKEN AWS_PROFILE

CEPH=tests/ceph/cluster.sh
CEPH_DIR=$WORK/ceph

# One server for the suite (cases run in subshells: its pid lives in a
# file; the cluster in CEPH_DIR). server_down/server_up stop and start the
# S3 server alone (RGW without the rest of the cluster).
if [ "$KIND" = s3s-fs ]; then
    server_up() { S3S_LOG=$WORK/s3s.log bash "$SERVER" start "$DATA" "$PORT" >"$WORK/s3s.pid"; }
    server_down() {
        [ -s "$WORK/s3s.pid" ] && bash "$SERVER" stop "$(cat "$WORK/s3s.pid")"
        rm -f "$WORK/s3s.pid"
    }
else
    server_up() { bash "$CEPH" rgw-start "$CEPH_DIR"; }
    server_down() { bash "$CEPH" rgw-stop "$CEPH_DIR"; }
fi

cleanup() {
    umount "$MNT" 2>/dev/null || true
    del_own_devices
    if [ "$KIND" = s3s-fs ]; then server_down || true; else bash "$CEPH" stop "$CEPH_DIR" || true; fi
    rm -rf "$WORK"
    # The default caches of commands given no --cache-dir (`snapshot create`
    # of a volume no daemon serves): this server's port, so ours alone.
    rm -rf "/var/cache/userblk/s3/127.0.0.1:$PORT"
}
trap cleanup EXIT

have_server() {
    have_frontend
    if [ "$KIND" = s3s-fs ]; then
        [ -x "$(bash "$SERVER" path)" ] || skip "s3s-fs is not installed (tests/s3/server.sh install)"
        [ -s "$WORK/s3s.pid" ] || server_up
        return 0
    fi
    if ! command -v radosgw >/dev/null; then
        # CI installs ceph (scripts/test.sh): missing there, it is a failure.
        [ "${CI:-}" != true ] || die "ceph is not installed, and CI installs it"
        skip "ceph is not installed (tests/ceph/cluster.sh install)"
    fi
    # The first case starts the cluster (the time it took is in its output).
    [ -d "$CEPH_DIR" ] || CEPH_RGW_PORT=$PORT bash "$CEPH" start "$CEPH_DIR" >/dev/null
}

# The S3 API, as the test user (tests/s3/s3req.py: mb, ls, get, exists, put, rm, race).
# The system's python, not a version manager's shim in PATH (one of those
# takes most of a second to start, which shifts the timing of the kill -9 case).
S3PY=$(command -v /usr/bin/python3 || command -v python3)
s3() { S3_ENDPOINT=$EP "$S3PY" tests/s3/s3req.py "$@"; }
mkbucket() { s3 mb "$1"; }
# absent BUCKET KEY: no such object (and the server said so).
absent() { local rc=0; s3 exists "$1" "$2" || rc=$?; [ "$rc" = 1 ]; }


# The frontend's add options.
if [ "$FRONTEND" = fuse ]; then FE="--frontend fuse --loop"; else FE="--frontend ublk"; fi
# s3s-fs's conditional writes are not atomic: `--lease auto` refuses it, so
# every add and copy there locks the volume on this host instead.
if [ "$KIND" = s3s-fs ]; then LEASE="--lease host"; COPYQ="&lease=host"; else LEASE=""; COPYQ=""; fi
FE="$FE $LEASE"


# add_s3 BUCKET PREFIX CACHE [OPTIONS...]: a device; prints "ID BLOCKDEV".
add_s3() {
    local b=$1 p=$2 c=$3 out id dev; shift 3
    mkbucket "$b"
    # With stderr: what the target logs while opening comes before the daemon's log.
    # shellcheck disable=SC2086
    out=$(ub add s3 --endpoint "$EP" --bucket "$b" --prefix "$p" --cache-dir "$c" "$@" \
        $FE 2>&1) || { echo "$out" >&2; return 1; }
    echo "$out" >&2
    echo "$out" >"$WORK/add.out"
    id=$(dev_id_of "$out")
    if [ "$FRONTEND" = fuse ]; then
        dev=$(sed -n 's/.*frontend [a-z]* block \([^ ]*\).*/\1/p' <<<"$out")
    else
        dev=/dev/ublkb$id
    fi
    [ -n "$id" ] && [ -b "$dev" ] || die "add printed no id or block device"
    echo "$id $dev"
}

state_is() { [ "$(list_word "$1" 11)" = "$2" ]; }

daemon_pid() { ub list -n "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["pid"])'; }

# Chunk objects of volume PREFIX in BUCKET.
objects() { # objects BUCKET PREFIX
    local keys
    keys=$(s3 ls "$1" "$2/chunks/") || die "listing $1/$2/chunks/ failed"
    grep -c . <<<"$keys" || true
}
