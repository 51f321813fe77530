#!/usr/bin/env python3
"""Write 64 KiB blocks to a block device, fsync after each, and log every
block whose fsync returned; or check a device against such a log.

write DEV LOG START END COUNT   blocks at random 64 KiB offsets in
                                [START, END), each offset at most once,
                                each fsync'd, then logged ("offset sha256"
                                per line, flushed). Stops at the first
                                error (a dying daemon).
check DEV LOG                   every logged offset must hold its block.

Each offset is written once: a later write whose fsync failed could have
reached the disk in part, and would leave a logged offset undefined.

Used by the s3 suite to kill a daemon in the middle of fsync'd writes.
Standard library only.
"""

import hashlib
import os
import random
import sys

BLOCK = 64 << 10


def write(dev, log, start, end, count):
    fd = os.open(dev, os.O_RDWR)
    rng = random.Random(os.getpid())
    blocks = (end - start) // BLOCK
    with open(log, "a", encoding="ascii") as out:
        for b in rng.sample(range(blocks), min(count, blocks)):
            off = start + b * BLOCK
            data = os.urandom(BLOCK)
            try:
                os.pwrite(fd, data, off)
                os.fsync(fd)
            except OSError as e:
                print("writer stopped: %s" % e, flush=True)
                return 0
            out.write("%d %s\n" % (off, hashlib.sha256(data).hexdigest()))
            out.flush()
    return 0


def check(dev, log):
    want = {}
    with open(log, encoding="ascii") as f:
        for line in f:
            off, sha = line.split()
            if int(off) in want:
                print("offset %s logged twice" % off)
                return 1
            want[int(off)] = sha
    fd = os.open(dev, os.O_RDONLY)
    bad = [off for off, sha in want.items()
           if hashlib.sha256(os.pread(fd, BLOCK, off)).hexdigest() != sha]
    print("checked %d fsync'd blocks: %d wrong" % (len(want), len(bad)))
    return 1 if bad else 0


def main():
    if sys.argv[1] == "write":
        return write(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7]))
    return check(sys.argv[2], sys.argv[3])


if __name__ == "__main__":
    sys.exit(main())
