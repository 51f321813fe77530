#!/usr/bin/env python3
"""Which chunk objects of a bucket no view references, worked out from the
bucket alone (through the S3 API, tests/s3/s3req.py), for the clones suite
and bench/s3clone.sh to check `userblk gc` against: a count made apart
from the code under test.

unreferenced BUCKET [PREFIX] [--grace SECONDS]
    print the keys of chunk objects (under PREFIX, when given) that no
    view of the bucket reads, sorted, one a line
views BUCKET [--grace SECONDS]
    print the views: "PREFIX EPOCH WHY", one a line

A view is a volume's head (its manifest's prefix and epoch), one of its
snapshots that is not deleted (or deleted less than --grace seconds ago,
default 0), or a clone's parent reference (prefix, epoch). A view
(P, E) reads chunk i from P's newest object of an epoch <= E (a tombstone
too: it hides the older ones), so that one object is referenced and
every older one of (P, i) is not, as far as this view goes. Chunk keys:
chunks/{i:016x} (epoch 0) and chunks/{i:016x}.{e:016x}. The layout is
docs/targets/s3.md's; this reads only what the bucket holds.
"""

import json
import re
import sys
import time

from s3req import Client, keys

CHUNK = re.compile(r"^(?:(.*)/)?chunks/([0-9a-f]{16})(?:\.([0-9a-f]{16}))?$")
MANIFEST = re.compile(r"^(?:(.*)/)?manifest\.json$")
SNAPSHOT = re.compile(r"^(?:(.*)/)?snapshots/([^/]+)\.json$")


def get_json(c, bucket, key):
    st, body = c.request("GET", f"/{bucket}/{key}")
    if st != 200:
        raise SystemExit(f"s3refs: get {bucket}/{key}: HTTP {st}")
    return json.loads(body)


def scan(bucket, grace):
    """(chunks: {prefix: {index: [(epoch, key)]}}, views: [(prefix, epoch, why)])."""
    c = Client()
    chunks, manifests, snaps = {}, [], []
    for k in keys(c, bucket, ""):
        m = CHUNK.match(k)
        if m:
            p, i, e = m.group(1) or "", int(m.group(2), 16), int(m.group(3) or "0", 16)
            chunks.setdefault(p, {}).setdefault(i, []).append((e, k))
        elif MANIFEST.match(k):
            manifests.append((MANIFEST.match(k).group(1) or "", k))
        elif SNAPSHOT.match(k):
            snaps.append((SNAPSHOT.match(k).group(1) or "", k))
    views = []
    for p, k in manifests:
        m = get_json(c, bucket, k)
        views.append((p, int(m.get("epoch", 0)), "head"))
        for ref in m.get("parents") or []:
            views.append((ref["prefix"], int(ref["epoch"]), f"parent of {p} ({ref.get('snapshot')})"))
    now = time.time()
    for p, k in snaps:
        r = get_json(c, bucket, k)
        gone = r.get("deleted_unix")
        if gone is not None and now - gone >= grace:
            continue
        views.append((p, int(r["epoch"]), f"snapshot {r['name']}"))
    return chunks, views


def referenced(chunks, views):
    refs = set()
    for p, e, _ in views:
        for versions in chunks.get(p, {}).values():
            seen = [v for v in versions if v[0] <= e]
            if seen:
                refs.add(max(seen)[1])
    return refs


def main(argv):
    args, grace = [], 0.0
    it = iter(argv[1:])
    for a in it:
        if a == "--grace":
            grace = float(next(it))
        else:
            args.append(a)
    if len(args) < 2 or args[0] not in ("unreferenced", "views"):
        print(__doc__, file=sys.stderr)
        return 2
    chunks, views = scan(args[1], grace)
    if args[0] == "views":
        for p, e, why in views:
            print(p, e, why)
        return 0
    prefix = args[2].rstrip("/") + "/" if len(args) > 2 else ""
    refs = referenced(chunks, views)
    every = {k for by_index in chunks.values() for vs in by_index.values() for _, k in vs}
    for k in sorted(every - refs):
        if k.startswith(prefix):
            print(k)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
