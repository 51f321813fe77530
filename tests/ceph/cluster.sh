#!/usr/bin/env bash
# A single-node Ceph cluster for tests: one monitor, one manager, one OSD on
# memstore (objects in RAM, capped) and RADOS Gateway on loopback, with
# cephx keys, everything under one directory.
#
#   tests/ceph/cluster.sh install        apt-get Debian's ceph packages (skipped if present)
#   tests/ceph/cluster.sh start DIR      start a cluster in DIR (must not exist); prints the env
#   tests/ceph/cluster.sh env DIR        print what clients need (eval it):
#                                        CEPH_CONF, S3_ENDPOINT, AWS_ACCESS_KEY_ID/SECRET
#   tests/ceph/cluster.sh rgw-stop DIR   stop RADOS Gateway only (the "server down" case)
#   tests/ceph/cluster.sh rgw-start DIR  start it again, on the same port
#   tests/ceph/cluster.sh stop DIR       stop every daemon and delete DIR
#
# S3: path-style requests to http://127.0.0.1:PORT (PORT is $CEPH_RGW_PORT,
# or a free one; in DIR/rgw.port), signature v4, any region; one user with fixed test
# credentials (not secrets; loopback only):
#   access key  userblk-test-key     (S3S_ACCESS_KEY overrides, as for s3s-fs)
#   secret key  userblk-test-secret  (S3S_SECRET_KEY overrides)
# Ceph clients (ceph, rados, radosgw-admin): CEPH_CONF=DIR/ceph.conf, as
# client.admin. Logs: DIR/log/. Memory: memstore holds at most
# CEPH_MEMSTORE_BYTES (default 1 GiB) of objects. Every wait has a deadline
# (CEPH_TIMEOUT seconds each, default 120; the VM is much slower than this
# machine); on failure the daemon's last log lines and one error line.
#
# In the VM guest (vm/run.sh) it runs as it is: DIR under the guest's
# writable /var/tmp, /tmp or /run (all in guest memory), loopback up
# (`ip link set lo up`; start says so when it is down). About 1 minute to
# start under TCG (docs/testing.md). The monitor speaks msgr2 only, so the
# kernel's rbd client maps with `rbd device map -o ms_mode=prefer-crc`.
set -euo pipefail

PKGS=(ceph-mon ceph-mgr ceph-osd radosgw ceph-common librbd-dev rbd-nbd)
ACCESS_KEY=${S3S_ACCESS_KEY:-userblk-test-key}
SECRET_KEY=${S3S_SECRET_KEY:-userblk-test-secret}
TIMEOUT=${CEPH_TIMEOUT:-120}
MEMSTORE_BYTES=${CEPH_MEMSTORE_BYTES:-$((1 << 30))}
# Names of the daemons (ceph's "$type.$id").
DAEMONS=(mon.a mgr.x osd.0 client.rgw.a)

usage() {
    sed -n '6,12p' "$0" >&2
    exit 2
}

die() {
    echo "tests/ceph/cluster.sh: $*" >&2
    exit 1
}

installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }
# (output captured first: grep -q closing the pipe early trips pipefail)
has_candidate() { local p; p=$(apt-cache policy "$1" 2>/dev/null); [[ $p =~ Candidate:\ [^\(] ]]; }

cmd_install() {
    local missing=() p
    for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
    if ((${#missing[@]} == 0)); then
        echo "ceph $(ceph --version | awk '{print $3}') already installed"
        return 0
    fi
    for p in "${missing[@]}"; do
        has_candidate "$p" && continue
        apt-get update -q </dev/null >/dev/null || die "apt-get update failed"
        break
    done
    echo "installing ${missing[*]}"
    # The packages' scripts start no daemon (none is configured), and apt is
    # never allowed to remove anything.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --no-remove \
        "${missing[@]}" </dev/null >/dev/null || die "apt-get install ${missing[*]} failed"
    echo "ceph $(ceph --version | awk '{print $3}') installed"
}

# The ceph CLI, bounded: a monitor that is not there makes it wait forever.
ceph_() { timeout "$TIMEOUT" ceph --connect-timeout 20 "$@"; }

log_tail() { # log_tail NAME
    local f
    for f in "$D/log/$1.log" "$D/log/$1.out"; do
        [[ -s $f ]] || continue
        echo "--- $f (last lines) ---" >&2
        tail -n 15 "$f" >&2
    done
}

# wait_until WHAT NAME COMMAND...: COMMAND succeeds within TIMEOUT seconds,
# while daemon NAME (its pid in DIR/run/NAME.pid) runs.
wait_until() {
    local what=$1 name=$2 deadline=$((SECONDS + TIMEOUT)) pid
    shift 2
    pid=$(cat "$D/run/$name.pid")
    until "$@" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log_tail "$name"
            die "$name exited before $what"
        fi
        if ((SECONDS >= deadline)); then
            log_tail "$name"
            die "$name: no $what within ${TIMEOUT}s"
        fi
        sleep 0.5
    done
}

# spawn NAME COMMAND...: a daemon in the foreground of its own session (it
# must not die with, or get signals meant for, the shell that started it);
# `stop` ends it by the pid kept in DIR/run/NAME.pid.
spawn() {
    local name=$1
    shift
    setsid "$@" -f -c "$D/ceph.conf" </dev/null >"$D/log/$name.out" 2>&1 &
    echo $! >"$D/run/$name.pid"
}

write_conf() { # write_conf MON_PORT RGW_PORT FSID
    # \$name is ceph's own meta variable (mon.a, osd.0, ...).
    cat >"$D/ceph.conf" <<EOF
[global]
fsid = $3
mon host = [v2:127.0.0.1:$1]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $D/keyring
run dir = $D/run
admin socket = $D/run/\$name.asok
log file = $D/log/\$name.log
mon data = $D/mon
mgr data = $D/mgr
osd data = $D/osd
# One OSD: pools of one replica, a few placement groups each (RGW makes
# about eight pools; the default 32 each would pass the per-OSD limit).
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
[osd]
osd objectstore = memstore
memstore device bytes = $MEMSTORE_BYTES
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$2
rgw thread pool size = 16
EOF
}

# A free TCP port on loopback (none listening on it now).
free_port() {
    local p i
    for ((i = 0; i < 50; i++)); do
        p=$((20000 + RANDOM % 20000))
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return 0; }
    done
    die "no free port found"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The test user's keys work: a bucket that does not exist is "NoSuchBucket"
# (not "InvalidAccessKeyId", nor no answer).
s3_answers() {
    local out
    out=$(S3_ENDPOINT=http://127.0.0.1:$(cat "$D/rgw.port") AWS_ACCESS_KEY_ID=$ACCESS_KEY \
        AWS_SECRET_ACCESS_KEY=$SECRET_KEY timeout 30 "$S3PY" "$S3REQ" ls userblk-probe "" 2>&1) || true
    [[ $out == *NoSuchBucket* ]]
}

osd_up() { [[ $(ceph_ osd dump 2>/dev/null | grep -c '^osd\.0 up') == 1 ]]; }

# add_key NAME [SUBSYSTEM CAPABILITY]...: a new key in DIR/keyring.
add_key() {
    local name=$1 caps=()
    shift
    while (($#)); do caps+=(--cap "$1" "$2"); shift 2; done
    ceph-authtool "$D/keyring" --gen-key -n "$name" "${caps[@]}" >/dev/null || die "ceph-authtool $name failed"
}

cmd_start() {
    D=${1:?DIR missing}
    [[ ! -e $D ]] || die "$D exists (a cluster needs a new directory)"
    command -v ceph-mon >/dev/null || die "ceph is not installed (tests/ceph/cluster.sh install)"
    # Every daemon listens on 127.0.0.1: with loopback down (a fresh VM
    # guest or network namespace) nothing would answer until the deadline.
    [[ $(cat /sys/class/net/lo/operstate 2>/dev/null) != down ]] || die "loopback is down (ip link set lo up)"
    local t0=$SECONDS mon_port rgw_port fsid osd_uuid
    mkdir -p "$D"/{run,log,mon,mgr,osd}
    D=$(cd "$D" && pwd)
    # A start that fails leaves nothing running (its logs are printed by then).
    trap 'if (($? != 0)); then stop_all; rm -rf "$D"; fi' EXIT
    mon_port=$(free_port)
    rgw_port=${CEPH_RGW_PORT:-$(free_port)}
    echo "$rgw_port" >"$D/rgw.port"
    fsid=$(cat /proc/sys/kernel/random/uuid)
    write_conf "$mon_port" "$rgw_port" "$fsid"
    export CEPH_CONF=$D/ceph.conf
    # Every key up front, in one keyring: the monitor imports them all at
    # mkfs (with their capabilities), and each daemon reads its own.
    local k=$D/keyring
    ceph-authtool --create-keyring "$k" >/dev/null || die "ceph-authtool failed"
    add_key mon. mon 'allow *'
    add_key client.admin mon 'allow *' osd 'allow *' mgr 'allow *' mds 'allow *'
    add_key mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *'
    add_key osd.0 mon 'allow profile osd' mgr 'allow profile osd' osd 'allow *'
    add_key client.rgw.a mon 'allow rw' osd 'allow rwx' mgr 'allow rw'
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$D/monmap" >/dev/null \
        || die "monmaptool failed"
    ceph-mon -c "$CEPH_CONF" --mkfs -i a --monmap "$D/monmap" --keyring "$k" \
        >"$D/log/mkfs-mon.out" 2>&1 || { log_tail mkfs-mon; die "ceph-mon --mkfs failed"; }
    spawn mon.a ceph-mon -i a
    wait_until "monitor quorum" mon.a ceph_ mon stat
    spawn mgr.x ceph-mgr -i x
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    ceph_ osd new "$osd_uuid" 0 >/dev/null || die "ceph osd new failed"
    ceph-osd -c "$CEPH_CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$D/log/mkfs-osd.out" 2>&1 \
        || { log_tail mkfs-osd; die "ceph-osd --mkfs failed"; }
    spawn osd.0 ceph-osd -i 0
    wait_until "OSD up" osd.0 osd_up
    spawn client.rgw.a radosgw -n client.rgw.a
    wait_until "RADOS Gateway on port $rgw_port" client.rgw.a port_open "$rgw_port"
    timeout "$TIMEOUT" radosgw-admin user create --uid userblk-test --display-name "userblk tests" \
        --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" >"$D/log/user.out" 2>&1 \
        || { log_tail user; die "radosgw-admin user create failed"; }
    wait_until "S3 answer with the test user's keys" client.rgw.a s3_answers
    echo "# ceph cluster up in $((SECONDS - t0))s" >&2
    cmd_env "$D"
}

cmd_env() {
    local d
    d=$(cd "${1:?DIR missing}" && pwd)
    [[ -s $d/rgw.port ]] || die "$d holds no cluster"
    echo "export CEPH_CONF=$d/ceph.conf"
    echo "export S3_ENDPOINT=http://127.0.0.1:$(cat "$d/rgw.port")"
    echo "export AWS_ACCESS_KEY_ID=$ACCESS_KEY AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
}

# stop_daemon NAME: SIGTERM, then SIGKILL after 10 s; returns once it is gone.
stop_daemon() {
    local f=$D/run/$1.pid pid i
    [[ -s $f ]] || return 0
    pid=$(cat "$f")
    if kill "$pid" 2>/dev/null; then
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "tests/ceph/cluster.sh: $1 (pid $pid) ignored SIGTERM for 10 s; killed" >&2
            kill -9 "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
        fi
    fi
    # Gone (or never started): forget it. A process SIGKILL does not end
    # (stuck in the kernel) keeps its pid file, and `stop` reports it.
    kill -0 "$pid" 2>/dev/null || rm -f "$f"
}

cmd_rgw_stop() {
    D=${1:?DIR missing}
    stop_daemon client.rgw.a
}

cmd_rgw_start() {
    D=$(cd "${1:?DIR missing}" && pwd)
    [[ ! -s $D/run/client.rgw.a.pid ]] || die "RADOS Gateway already runs"
    spawn client.rgw.a radosgw -n client.rgw.a
    wait_until "RADOS Gateway on port $(cat "$D/rgw.port")" client.rgw.a port_open "$(cat "$D/rgw.port")"
    wait_until "S3 answer" client.rgw.a s3_answers
}

# In reverse order of start: the gateway first, the monitor last (the
# others are its clients).
stop_all() {
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[i]}"; done
}

cmd_stop() {
    D=${1:?DIR missing}
    [[ -d $D ]] || return 0
    stop_all
    local n left=()
    for n in "${DAEMONS[@]}"; do [[ ! -e $D/run/$n.pid ]] || left+=("$n"); done
    ((${#left[@]} == 0)) || die "still running: ${left[*]}; $D kept"
    rm -rf "$D"
}

S3REQ=$(cd "$(dirname "$0")/../s3" && pwd)/s3req.py
S3PY=$(command -v /usr/bin/python3 || command -v python3)

case ${1:-} in
    install) cmd_install ;;
    start) shift; cmd_start "$@" ;;
    env) shift; cmd_env "$@" ;;
    rgw-stop) shift; cmd_rgw_stop "$@" ;;
    rgw-start) shift; cmd_rgw_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    *) usage ;;
esac
