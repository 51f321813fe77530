#!/usr/bin/env bash
# Demo body: a 1 GiB RAM disk with ext4 on it, used, remounted, checked, removed.
set -euo pipefail
userblk=${USERBLK:-$PWD/target/release/userblk}
mnt=$(mktemp -d /run/userblk-demo.XXXXXX)

set -x
"$userblk" add mem --size 1G
"$userblk" list
mkfs.ext4 -q /dev/ublkb0
mount /dev/ublkb0 "$mnt"
seq 1 100000 >"$mnt/numbers.txt"
sha256sum "$mnt/numbers.txt" >/run/userblk-demo.sum
umount "$mnt"
fsck.ext4 -n -f /dev/ublkb0
mount /dev/ublkb0 "$mnt"
(cd "$mnt" && sha256sum -c /run/userblk-demo.sum)
df -h "$mnt"
umount "$mnt"
"$userblk" del -n 0
set +x
echo "demo: /dev/ublkb0 held ext4 across umount/mount"
