#!/usr/bin/env python3
"""Summarise bench/guest/ublk-vs-kernel.sh results (runs in the guest).

    summarize.py --iops RUN.json   total IOPS (read + write) of one fio run
    summarize.py OUT               table of OUT/raw/*.json to stdout, OUT/summary.json

Raw runs are OUT/raw/<workload>.<userblk|kernel>.<repeat>.json; OUT/workloads.tsv
lists key, title and kernel label per workload; OUT/commands.txt the fio lines.
"""
import json
import statistics
import sys
from pathlib import Path


def load(path):
    # fio may print notes before the JSON object even with --output.
    text = Path(path).read_text()
    return json.loads(text[text.index("{"):])


def iops(path):
    """Read + write IOPS of a single-job fio run; fails on a job error."""
    job = load(path)["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"{path}: fio job error {job['error']}")
    return job["read"]["iops"] + job["write"]["iops"]


def stats(values):
    if not values:
        return None
    return {
        "runs": [round(v) for v in values],
        "median": round(statistics.median(values)),
        "min": round(min(values)),
        "max": round(max(values)),
    }


def cell(s, label=""):
    if s is None:
        return "no data"
    text = f"{s['median']} ({s['min']}-{s['max']})"
    return f"{text:<22} {label}".rstrip()


def main(out):
    out = Path(out)
    rows = []
    for line in (out / "workloads.tsv").read_text().splitlines():
        key, title, klabel = line.split("\t")
        sides = {}
        for side in ("userblk", "kernel"):
            runs = sorted(out.glob(f"raw/{key}.{side}.*.json"),
                          key=lambda p: int(p.name.split(".")[2]))
            vals = []
            for p in runs:
                try:
                    vals.append(iops(p))
                except (ValueError, KeyError, IndexError, SystemExit) as e:
                    print(f"skipping {p.name}: {e}", file=sys.stderr)
            sides[side] = stats(vals)
        u, k = sides["userblk"], sides["kernel"]
        ratio = round(u["median"] / k["median"], 2) if u and k and k["median"] else None
        rows.append({"key": key, "workload": title, "kernel_driver": klabel,
                     "userblk": u, "kernel": k, "ratio": ratio})

    summary = {"env": (out / "env.txt").read_text().splitlines(),
               "commands": (out / "commands.txt").read_text().splitlines(),
               "workloads": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"{'workload':<24} {'userblk IOPS (min-max)':<24} {'kernel IOPS (min-max)':<34} ratio")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        print(f"{r['workload']:<24} {cell(r['userblk']):<24} "
              f"{cell(r['kernel'], '(' + r['kernel_driver'] + ')'):<34} {ratio}")
    print()
    print("ratio = median userblk IOPS / median kernel IOPS (read + write for randrw)")
    print("fio command lines (FILE: raw/<workload>.<side>.<repeat>.json):")
    for c in summary["commands"]:
        print(f"  {c}")
    print()
    print("guest:")
    for e in summary["env"]:
        print(f"  {e}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--iops":
        print(round(iops(sys.argv[2])))
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        raise SystemExit(__doc__)
