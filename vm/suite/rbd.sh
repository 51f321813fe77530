#!/usr/bin/env bash
# Real-kernel suite of the rbd target: tests/host/rbd.sh on ublk devices,
# with a one-node Ceph cluster (tests/ceph/cluster.sh) inside the VM on
# loopback, as root:
#   vm/run.sh -- vm/suite/rbd.sh
# TCG is slow: CEPH_TIMEOUT (passed with USERBLK_VM_PASSENV) bounds each
# wait of the cluster's start; 600 s here unless given.
set -u
cd "$(dirname "$0")/../.."
[ -e /dev/ublk-control ] || modprobe ublk_drv || true
ip link set lo up 2>/dev/null || true
export CEPH_TIMEOUT=${CEPH_TIMEOUT:-600}
echo "kernel $(uname -r); userblk $("${USERBLK:-$PWD/target/release/userblk}" --version)"
exec bash tests/host/rbd.sh --frontend ublk "$@"
