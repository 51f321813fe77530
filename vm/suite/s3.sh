#!/usr/bin/env bash
# Real-kernel suite of the s3 target: tests/s3/suite.sh on ublk devices, with
# the S3 server (s3s-fs) running inside the VM on loopback, as root:
#   vm/run.sh -- vm/suite/s3.sh
set -u
cd "$(dirname "$0")/../.."
[ -e /dev/ublk-control ] || modprobe ublk_drv || true
ip link set lo up 2>/dev/null || true
echo "kernel $(uname -r); userblk $("${USERBLK:-$PWD/target/release/userblk}" --version)"
exec bash tests/s3/suite.sh --frontend ublk "$@"
