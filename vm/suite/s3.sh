#!/usr/bin/env bash
# Real-kernel suite of the s3 target: tests/s3/suite.sh on ublk devices, with
# the S3 server running inside the VM on loopback, as root: s3s-fs, or with
# --server rgw RADOS Gateway of a one-node Ceph cluster started in the guest
# (tests/ceph/cluster.sh; about a minute under TCG):
#   vm/run.sh -- vm/suite/s3.sh [--server s3s-fs|rgw]
# (vm/suite/s3-rgw.sh is the RGW form under a name of its own, for several.sh;
# S3_VM_SUITE=clones runs tests/s3/clones.sh instead, as vm/suite/s3-clones.sh.)
set -u
cd "$(dirname "$0")/../.."
[ -e /dev/ublk-control ] || modprobe ublk_drv || true
ip link set lo up 2>/dev/null || true
echo "kernel $(uname -r); userblk $("${USERBLK:-$PWD/target/release/userblk}" --version)"
exec bash "tests/s3/${S3_VM_SUITE:-suite}.sh" --frontend ublk "$@"
