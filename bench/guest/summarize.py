#!/usr/bin/env python3
"""Summarise bench/guest/ublk-vs-kernel.sh results (runs in the guest).

    summarize.py --iops RUN.json   one fio run: IOPS (read + write) and CPU per I/O
    summarize.py OUT               table of OUT/raw/*.json to stdout, OUT/summary.json

Raw runs are OUT/raw/<workload>.<userblk|kernel>.<repeat>.json (+ .cpu, guest
CPU jiffies during the run, written by the guest script); OUT/workloads.tsv
lists key, title and kernel label per workload; OUT/commands.txt the fio lines.
"""
import json
import os
import statistics
import sys
from pathlib import Path


def load(path):
    # fio may print notes before the JSON object even with --output.
    text = Path(path).read_text()
    return json.loads(text[text.index("{"):])


def run(path):
    """One fio run: (read + write IOPS, guest CPU µs per I/O, vCPUs busy).

    The CPU figures come from the .cpu file next to the JSON ("busy total
    clk_tck" jiffies over all guest CPUs during the run), None without it.
    Fails on a job error."""
    path = Path(path)
    job = load(path)["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"{path}: fio job error {job['error']}")
    iops = job["read"]["iops"] + job["write"]["iops"]
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    us_per_io = busy_cpus = None
    cpu = path.with_suffix(".cpu")
    if cpu.exists() and ios:
        busy, total, hz = (int(x) for x in cpu.read_text().split())
        us_per_io = busy / hz * 1e6 / ios
        busy_cpus = busy / total * (os.cpu_count() or 1) if total else None
    return iops, us_per_io, busy_cpus


def describe(path):
    iops, us, cpus = run(path)
    text = f"{round(iops)} IOPS"
    if us is not None:
        text += f", {us:.1f} us guest CPU per I/O, {cpus:.2f} vCPUs busy"
    return text


def stats(runs):
    """runs: [(iops, us_per_io, busy_cpus)] -> IOPS median/min/max, CPU medians."""
    if not runs:
        return None
    iops = [r[0] for r in runs]
    us = [r[1] for r in runs if r[1] is not None]
    cpus = [r[2] for r in runs if r[2] is not None]
    return {
        "runs": [round(v) for v in iops],
        "median": round(statistics.median(iops)),
        "min": round(min(iops)),
        "max": round(max(iops)),
        "cpu_us_per_io": round(statistics.median(us), 1) if us else None,
        "busy_vcpus": round(statistics.median(cpus), 2) if cpus else None,
    }


def cpu_cell(s):
    if s is None or s["cpu_us_per_io"] is None:
        return "-"
    return f"{s['cpu_us_per_io']:.1f} us ({s['busy_vcpus']:.2f} vCPUs)"


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
                    vals.append(run(p))
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
    print()
    print(f"{'guest CPU per I/O':<24} {'userblk':<24} {'kernel':<34} ratio")
    for r in rows:
        u, k = r["userblk"], r["kernel"]
        ratio = "-"  # here: userblk's CPU per I/O over the kernel's
        if u and k and u["cpu_us_per_io"] and k["cpu_us_per_io"]:
            ratio = f"{u['cpu_us_per_io'] / k['cpu_us_per_io']:.2f}"
        print(f"{r['workload']:<24} {cpu_cell(u):<24} {cpu_cell(k):<34} {ratio}")
    print()
    print("guest CPU per I/O: busy time of all guest CPUs during the run / I/Os done (median);")
    print("vCPUs busy: how many of the guest's CPUs that time kept busy on average.")
    print()
    print("fio command lines (FILE: raw/<workload>.<side>.<repeat>.json):")
    for c in summary["commands"]:
        print(f"  {c}")
    print()
    print("guest:")
    for e in summary["env"]:
        print(f"  {e}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--iops":
        print(describe(sys.argv[2]))
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        raise SystemExit(__doc__)
