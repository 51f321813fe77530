#!/usr/bin/env bash
# Real-kernel crash-consistency bench: tests/crash/crash.sh on ublk devices
# (ext4 and xfs on mem under flakey, power cuts, fsck, fsync'd data), inside
# the VM (vm/run.sh), as root. Extra arguments go to crash.sh:
#   vm/run.sh -- vm/suite/crash.sh --rounds 5 --fs ext4
set -u
cd "$(dirname "$0")/../.."
[ -e /dev/ublk-control ] || modprobe ublk_drv || true
# Power cuts and failing writes make the kernel log I/O errors by the
# hundred: keep them off the console (failures still show the dmesg tail).
dmesg -n 1 2>/dev/null || true
echo "kernel $(uname -r); userblk $("${USERBLK:-$PWD/target/release/userblk}" --version)"
exec bash tests/crash/crash.sh --frontend ublk "$@"
