#!/usr/bin/env bash
# Write the qcow2_image seed corpus with qemu-img and qemu-io (qemu-utils):
# small valid images with 512-byte clusters, each prefixed with the target's
# control byte (bit 0: open writable). Run from anywhere; it replaces
# fuzz/corpus/qcow2_image/. The seeds are committed, so this only needs
# running to change them.
set -euo pipefail

out=$(cd "$(dirname "$0")" && pwd)/corpus/qcow2_image
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

img() { qemu-img create -q -f qcow2 -o "cluster_size=512,$1" "$2" "$3"; }
io() { local f=$1; shift; qemu-io -f qcow2 "${@/#/-c}" "$f" >/dev/null; }
# seed NAME CONTROL IMAGE: the control byte, then the image.
seed() { { printf "\\x$2"; cat "$3"; } >"$out/$1"; }

rm -rf "$out"
mkdir -p "$out"

# Version 3: data, a zero cluster, data across an L2 boundary.
img compat=1.1 v3.qcow2 64K
io v3.qcow2 "write -P 0x11 0 1536" "write -z 4096 512" "write -P 0x22 32512 1024"
seed v3-rw 01 v3.qcow2
seed v3-ro 00 v3.qcow2

# Version 2 (no zero clusters, 72-byte header).
img compat=0.10 v2.qcow2 32K
io v2.qcow2 "write -P 0x33 512 2048"
seed v2-rw 03 v2.qcow2

# Compressed clusters (qemu packs them unaligned).
head -c 2048 /dev/zero | tr '\0' 'a' >r.raw
head -c 2048 /dev/zero | tr '\0' 'b' >>r.raw
qemu-img convert -q -c -O qcow2 -o cluster_size=512 r.raw z.qcow2
seed compressed-rw 05 z.qcow2

# Refcount widths other than 16 bits.
img refcount_bits=1 rc1.qcow2 16K
io rc1.qcow2 "write -P 0x44 1024 1024"
seed refcount1-rw 07 rc1.qcow2
img refcount_bits=64 rc64.qcow2 16K
io rc64.qcow2 "write -P 0x55 0 512"
seed refcount64-rw 09 rc64.qcow2

# Backing files the harness provides (base.raw, base.qcow2), by relative
# name with a format extension.
head -c 65536 /dev/zero >base.raw
qemu-img create -q -f qcow2 -o cluster_size=512 base.qcow2 1M
img backing_file=base.raw,backing_fmt=raw over-raw.qcow2 64K
io over-raw.qcow2 "write -P 0x66 1000 600"
seed backing-raw-rw 0b over-raw.qcow2
img backing_file=base.qcow2,backing_fmt=qcow2 over-qcow2.qcow2 16K
seed backing-qcow2-ro 00 over-qcow2.qcow2

# An internal snapshot: a snapshot table, shared clusters, read-only.
img compat=1.1 snap.qcow2 16K
io snap.qcow2 "write -P 0x77 0 1024"
qemu-img snapshot -c s1 snap.qcow2
io snap.qcow2 "write -P 0x78 512 512"
seed snapshot-rw 0d snap.qcow2

ls -l "$out"
