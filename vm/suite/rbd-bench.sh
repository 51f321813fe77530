#!/usr/bin/env bash
# The fast form of bench/rbd.sh, for CI: its guest side at a tiny size (one
# Ceph cluster in guest memory, a 64 MiB RBD image, each fio job 2 s once)
# on the kernel's rbd driver, rbd-nbd and `userblk add rbd` over ublk. It
# asserts only that each device maps, serves every job without an error and
# unmaps; the figures are printed as notes, not judged (TCG, shared host).
# A binary without the rbd target skips its case. Runs inside the VM
# (vm/run.sh), as root:
#   vm/run.sh -- vm/suite/rbd-bench.sh
set -u
cd "$(dirname "$0")/../.."
. vm/suite/lib.sh

[ -x "$USERBLK" ] || { echo "no binary at $USERBLK (cargo build --release first)"; exit 2; }
[ -e /dev/ublk-control ] || modprobe ublk_drv || true
OUT=$(mktemp -d /run/rbd-bench-suite.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

case_bench() {
    if ! command -v rbd-nbd >/dev/null || ! command -v ceph-osd >/dev/null; then
        [ "${CI:-}" != true ] || die "ceph or rbd-nbd is not installed, and CI installs them"
        skip "ceph or rbd-nbd is not installed (tests/ceph/cluster.sh install)"
    fi
    # Its own output goes to the case log (shown on failure).
    bash bench/guest/rbd.sh "$OUT" 2 1 64 || die "bench/guest/rbd.sh failed"
    sed -n 's/^ceph: /note: ceph: /p' "$OUT/env.txt"
}

# side_works SIDE: every job of SIDE left a fio result without an error.
side_works() {
    local side=$1 j
    [ -s "$OUT/env.txt" ] || skip "the bench did not run"
    if [ "$side" = userblk ] && [ -s "$OUT/notes.txt" ]; then skip "$(cat "$OUT/notes.txt")"; fi
    for j in randread randwrite read write; do
        [ -s "$OUT/raw/$j.$side.1.json" ] || die "no $j result on $side"
        echo "note: $side $j: $(python3 bench/guest/rbd_summary.py --one "$OUT/raw/$j.$side.1.json")"
    done
    grep -q "^$side " "$OUT/devices.txt" || die "$side was never mapped"
}

plan 4
case_run "bench/rbd.sh in the guest, 2 s per job" case_bench
case_run "krbd: maps, serves fio, unmaps" side_works krbd
case_run "rbd-nbd: maps, serves fio, unmaps" side_works rbd-nbd
case_run "userblk rbd: adds, serves fio, deletes" side_works userblk
summary
