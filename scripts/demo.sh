#!/usr/bin/env bash
# The main job: `userblk add mem --size 1G` gives /dev/ublkb0, which holds an
# ext4 filesystem across umount/mount. Runs on this kernel if it has ublk_drv,
# otherwise inside the Debian 6.12 VM (vm/run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

cargo build --release --locked
if [ -e /dev/ublk-control ] || as_root modprobe -q ublk_drv 2>/dev/null; then
    as_root bash scripts/guest/demo.sh
else
    echo "this kernel has no ublk_drv: running the demo in the VM"
    as_root vm/setup.sh
    as_root vm/run.sh -- scripts/guest/demo.sh
fi
