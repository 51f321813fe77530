#!/usr/bin/env python3
"""The crash bench's workload and its checker.

run:    create, replace and delete files under DIR/rNN, fsyncing many of
        them, and record in MANIFEST (a JSON line per change, appended and
        flushed before the next step) what each name must hold after a
        crash: a set of acceptable SHA-256s and/or "absent". A name is
        recorded only once an fsync of it (and of its directory) returned
        success before the power cut was started; while a replace or delete
        of a recorded name is under way, both the old and the new state are
        acceptable, and once the cut is started they stay acceptable: a real
        power cut kills the program at that instant, so no fsync returns
        after it. (xfs returns success from a directory fsync whose log
        write failed in the cut, if another log push aborted the change
        first: such a promise is worth nothing.) Names never fsync'd are
        not recorded: after a crash anything goes for them.
        With --cut-after K, after K operations a burst of unflushed writes
        is started and CUT_CMD (a power cut) runs up to 20 ms later; with
        --cut-at-ms T, CUT_CMD runs from a thread T ms after the workload
        starts, whatever it is doing. The workload then carries on until
        the file system fails it.

verify: check every recorded name against the manifest (the last line for
        a name wins). Exit status 1 and one line per mismatch if any differ.

Only the standard library: it runs on the host and in the VM alike.
"""

import argparse
import hashlib
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import threading
import time

ABSENT = "absent"


def sha(data):
    return hashlib.sha256(data).hexdigest()


def fsync_path(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path, data, sync, push=False):
    """Write `data` to a new `path`; fsync it, or with `push` start its
    writeback without waiting or flushing (so it sits in the disk's cache)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if sync:
            os.fsync(fd)
        elif push:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Manifest:
    def __init__(self, path, root):
        self.f = open(path, "a", encoding="ascii")
        self.root = root

    def record(self, path, ok):
        rel = os.path.relpath(path, self.root)
        self.f.write(json.dumps({"path": rel, "ok": sorted(ok)}) + "\n")
        self.f.flush()


def size(rng):
    r = rng.random()
    if r < 0.80:
        return rng.randrange(1, 33) * 512
    if r < 0.98:
        return rng.randrange(16, 129) * 1024
    return rng.randrange(128, 1025) * 1024


def full(root, limit):
    """Whether the file system is more than `limit` (0 to 1) used."""
    st = os.statvfs(root)
    return st.f_blocks and 1 - st.f_bavail / st.f_blocks > limit


def load(manifest):
    """The manifest as {relative name: acceptable states}; the last line wins."""
    want = {}
    try:
        with open(manifest, encoding="ascii") as f:
            for line in f:
                e = json.loads(line)
                want[e["path"]] = e["ok"]
    except FileNotFoundError:
        pass
    return want


def prune(root, man, limit):
    """Delete whole earlier rounds, oldest first, until the file system is
    at most `limit` used. Rounds accumulate on one ageing file system, and a
    full one would stop the workload with ENOSPC instead of a power cut.
    Each deleted name is recorded as old-or-absent, the deletion made
    durable (directory fsync and sync), then recorded as absent."""
    rounds = sorted(d for d in os.listdir(root) if d.startswith("r") and d[1:].isdigit())
    while rounds and full(root, limit):
        old = rounds.pop(0)
        names = {n: ok for n, ok in load(man.f.name).items() if n.startswith(old + "/")}
        for n, ok in names.items():
            man.record(os.path.join(root, n), set(ok) | {ABSENT})
        shutil.rmtree(os.path.join(root, old))
        fsync_path(root, directory=True)
        os.sync()
        for n in names:
            man.record(os.path.join(root, n), [ABSENT])
        print("pruned round %s (%d recorded names)" % (old, len(names)), flush=True)


def run(args):
    rng = random.Random(args.seed)
    root = args.dir
    top = os.path.join(root, "r%03d" % args.round)
    man = Manifest(args.manifest, root)
    # Before the cut timer starts: a prune is not part of what is tested.
    prune(root, man, 0.35)
    synced = {}  # name -> sha of what an fsync made durable
    states = {}  # name -> the states the manifest accepts for it now
    unsynced = []
    stats = {"ops": 0, "fsynced": 0, "replaced": 0, "deleted": 0, "after_cut": 0}
    cut_fired = threading.Event()

    def widen(name, state):
        # Before a change: the old and the new state are both acceptable.
        states[name] = states.get(name, set()) | {state}
        man.record(name, states[name])

    def settle(name, state):
        # After the fsync that made a change durable: only the new state,
        # if the fsync returned before the cut was started. `False` if not.
        if cut_fired.is_set():
            stats["after_cut"] += 1
            return False
        states[name] = {state}
        man.record(name, states[name])
        return True
    after_cut = 0
    filling = False
    start = time.monotonic()

    def cut(delay, what):
        # From a thread: the cut lands in the middle of whatever the
        # operations are doing by then.
        time.sleep(delay)
        cut_fired.set()
        print("cut %s, %d ops done (%.2fs)" % (what, stats["ops"], time.monotonic() - start),
              flush=True)
        subprocess.run(shlex.split(args.cut_cmd), check=True, stdout=subprocess.DEVNULL)

    if args.cut_at_ms is not None:
        threading.Thread(target=cut, args=(args.cut_at_ms / 1000, "at %d ms" % args.cut_at_ms)).start()

    try:
        os.makedirs(top, exist_ok=True)
        dirs = []
        for d in range(4):
            p = os.path.join(top, "d%d" % d)
            os.makedirs(p, exist_ok=True)
            dirs.append(p)
        for p in dirs:
            fsync_path(p, directory=True)
        fsync_path(top, directory=True)
        fsync_path(root, directory=True)
        for i in range(args.ops):
            if args.cut_after is not None and i == args.cut_after:
                # Unflushed data on its way to the disk, then the cut.
                name = os.path.join(dirs[0], "burst%05d" % i)
                write_file(name, os.urandom(rng.randrange(128, 1025) * 1024), sync=False, push=True)
                delay = rng.random() * 0.02
                cut(delay, "%d ms after op %d and a burst" % (delay * 1000, i))
            if cut_fired.is_set():
                after_cut += 1
                if after_cut > 2000:
                    break
            d = dirs[rng.randrange(len(dirs))]
            r = rng.random()
            if i % 8 == 0:
                # statvfs every 8 ops; the answer holds for the next 8.
                filling = full(root, 0.5)
            if synced and filling:
                # Past half full: replace, delete and drop only, so it never fills up.
                r = 0.70 + 0.30 * rng.random()
            op = ("create" if r < 0.45 else "unsynced" if r < 0.65 else "append" if r < 0.70
                  else "replace" if r < 0.85 else "delete" if r < 0.93 else "drop")
            if op in ("replace", "delete") and not synced:
                op = "create"
            if op in ("append", "drop") and not unsynced:
                op = "delete" if filling and synced else "unsynced"
            if op == "create":
                # A new file, fsync'd with its directory: must survive.
                name = os.path.join(d, "f%05d" % i)
                data = os.urandom(size(rng))
                write_file(name, data, sync=True)
                fsync_path(d, directory=True)
                if settle(name, sha(data)):
                    synced[name] = sha(data)
                    stats["fsynced"] += 1
            elif op == "unsynced":
                # A new file nobody fsyncs: anything goes for it.
                name = os.path.join(d, "u%05d" % i)
                write_file(name, os.urandom(size(rng)), sync=False, push=rng.random() < 0.5)
                unsynced.append(name)
            elif op == "append":
                name = unsynced[rng.randrange(len(unsynced))]
                with open(name, "ab") as f:
                    f.write(os.urandom(size(rng)))
            elif op == "replace":
                # Replace a durable file the safe way: temporary, fsync, rename, fsync the directory.
                name = rng.choice(sorted(synced))
                data = os.urandom(size(rng))
                tmp = name + ".tmp"
                write_file(tmp, data, sync=True)
                widen(name, sha(data))
                os.rename(tmp, name)
                fsync_path(os.path.dirname(name), directory=True)
                synced[name] = sha(data)
                if settle(name, sha(data)):
                    stats["replaced"] += 1
            elif op == "delete":
                # Delete a durable file, and make the deletion durable.
                name = rng.choice(sorted(synced))
                widen(name, ABSENT)
                os.unlink(name)
                fsync_path(os.path.dirname(name), directory=True)
                del synced[name]
                if settle(name, ABSENT):
                    stats["deleted"] += 1
            else:
                os.unlink(unsynced.pop(rng.randrange(len(unsynced))))
            stats["ops"] += 1
    except OSError as e:
        print("stopped by %s after %d ops (%.2fs)" % (e, stats["ops"], time.monotonic() - start), flush=True)
        if not cut_fired.is_set() and args.expect_cut:
            return 1
    print(json.dumps(stats), flush=True)
    return 0


def verify(args):
    want = load(args.manifest)
    bad = []
    present = 0
    for rel, ok in sorted(want.items()):
        p = os.path.join(args.dir, rel)
        try:
            with open(p, "rb") as f:
                got = sha(f.read())
            present += 1
        except FileNotFoundError:
            got = ABSENT
        except OSError as e:
            got = "unreadable (%s)" % e
        if got not in ok:
            bad.append("%s: holds %s, must be one of %s" % (rel, got, ", ".join(ok)))
    for b in bad[:20]:
        print("MISMATCH " + b)
    print("verified %d names (%d files present): %d mismatches" % (len(want), present, len(bad)))
    return 1 if bad else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--dir", required=True)
    r.add_argument("--manifest", required=True)
    r.add_argument("--round", type=int, default=0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--ops", type=int, default=100)
    r.add_argument("--cut-after", type=int)
    r.add_argument("--cut-at-ms", type=int)
    r.add_argument("--cut-cmd")
    r.add_argument("--expect-cut", action="store_true")
    v = sub.add_parser("verify")
    v.add_argument("--dir", required=True)
    v.add_argument("--manifest", required=True)
    args = p.parse_args()
    if args.cmd == "run":
        if (args.cut_after is not None or args.cut_at_ms is not None) and not args.cut_cmd:
            p.error("--cut-after and --cut-at-ms need --cut-cmd")
        return run(args)
    return verify(args)


if __name__ == "__main__":
    sys.exit(main())
