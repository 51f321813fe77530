#!/usr/bin/env bash
# Real-kernel suite of the s3 target's snapshots, clones and gc:
# tests/s3/clones.sh on ublk devices, with s3s-fs inside the VM on loopback:
#   vm/run.sh -- vm/suite/s3-clones.sh
# (CLONES, the clones of the golden volume, 6 by default; ONLY=regex.)
set -u
cd "$(dirname "$0")/../.."
[ -e /dev/ublk-control ] || modprobe ublk_drv || true
ip link set lo up 2>/dev/null || true
echo "kernel $(uname -r); userblk $("${USERBLK:-$PWD/target/release/userblk}" --version)"
exec bash tests/s3/clones.sh --frontend ublk "$@"
