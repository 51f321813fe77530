#!/usr/bin/env python3
"""Summarise bench/guest/rbd.sh results (runs in the guest).

    rbd_summary.py --one RUN.json   one fio run: IOPS and MiB/s
    rbd_summary.py OUT              table of OUT/raw/*.json to stdout, OUT/summary.json

Raw runs are OUT/raw/<job>.<side>.<repeat>.json, side one of userblk,
rbd-nbd, krbd; OUT/env.txt, devices.txt and commands.txt are quoted.
"""
import json
import statistics
import sys
from pathlib import Path

SIDES = ("userblk", "rbd-nbd", "krbd")
# job, title, unit (IOPS for 4k jobs, MiB/s for 1 MiB ones)
JOBS = (("randread", "4k randread QD32", "IOPS"),
        ("randwrite", "4k randwrite QD32", "IOPS"),
        ("read", "1M seq read QD8", "MiB/s"),
        ("write", "1M seq write QD8", "MiB/s"))


def load(path):
    # fio may print notes before the JSON object even with --output.
    text = Path(path).read_text()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    if job.get("error"):
        raise ValueError(f"fio job error {job['error']}")
    return job


def value(job, unit):
    rw = job["read"]["io_bytes"] and job["read"] or job["write"]
    return rw["iops"] if unit == "IOPS" else rw["bw_bytes"] / 2**20


def one(path):
    job = load(path)
    return f"{round(value(job, 'IOPS'))} IOPS, {value(job, 'MiB/s'):.1f} MiB/s"


def cell(v):
    if not v:
        return "-"
    return f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})"


def ratio(a, b):
    if not a or not b:
        return None
    return round(statistics.median(a) / statistics.median(b), 2)


def main(out):
    out = Path(out)
    rows = []
    for job, title, unit in JOBS:
        vals = {}
        for side in SIDES:
            vals[side] = []
            for p in sorted(out.glob(f"raw/{job}.{side}.*.json")):
                try:
                    vals[side].append(value(load(p), unit))
                except (ValueError, KeyError, IndexError) as e:
                    print(f"skipping {p.name}: {e}", file=sys.stderr)
        rows.append({"job": job, "title": title, "unit": unit, "runs": vals,
                     "userblk/rbd-nbd": ratio(vals["userblk"], vals["rbd-nbd"]),
                     "userblk/krbd": ratio(vals["userblk"], vals["krbd"]),
                     "rbd-nbd/krbd": ratio(vals["rbd-nbd"], vals["krbd"])})
    (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")

    def r(x):
        return f"{x:.2f}" if x is not None else "-"
    print(f"{'job':<19} {'unit':<6}" + "".join(f" {s + ' (min-max)':>20}" for s in SIDES)
          + "  ub/nbd  ub/krbd  nbd/krbd")
    for row in rows:
        print(f"{row['title']:<19} {row['unit']:<6}"
              + "".join(f" {cell(row['runs'][s]):>20}" for s in SIDES)
              + f"  {r(row['userblk/rbd-nbd']):>6}  {r(row['userblk/krbd']):>7}  {r(row['rbd-nbd/krbd']):>8}")
    print()
    print("median of the repeats (min-max); ratios of medians; goal: userblk ahead of rbd-nbd"
          " (ub/nbd > 1) and ub/krbd >= 0.8 on every job.")
    for name in ("notes.txt", "env.txt", "devices.txt", "commands.txt"):
        f = out / name
        if f.exists():
            print()
            print(f"{name}:")
            for line in f.read_text().splitlines():
                print(f"  {line}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(one(sys.argv[2]))
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        raise SystemExit(__doc__)
