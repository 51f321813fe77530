#!/usr/bin/env python3
"""Summarise bench/perf.sh results: userblk against rublk and the kernel.

    perf_summary.py OUT    tables of OUT/raw/*.json: writes OUT/summary.txt (also
                           printed), summary.csv, runs.csv, summary.json

OUT holds what bench/guest/perf.sh wrote: raw/<workload>.<repeat>.json (one fio
run, a job "<workload>-<side>" per device), raw/<workload>.<side>.<repeat>.cpu
("hz CLK_TCK NCPU", then "pre"/"post" lines with /proc/stat's cpu line from
before and after that job), workloads.tsv, devices.tsv, env.txt, commands.txt,
order.tsv; and host.txt from bench/perf.sh when present.
"""
import csv
import json
import statistics
import sys
from pathlib import Path

SIDES = ("userblk", "rublk", "kernel")


def load(path):
    # fio prints notes (exec_prerun's "Saving output of ...") before the JSON.
    text = Path(path).read_text()
    return json.loads(text[text.index("{"):])


def cpu_window(path):
    """Guest CPU jiffies over one job: (busy, total, hz, ncpu) or None.

    From the earliest "pre" to the latest "post" line (a 2-job run has one
    of each per clone). /proc/stat's cpu line: user nice system idle iowait
    irq softirq steal ...; busy leaves out idle and iowait."""
    if not path.exists():
        return None
    hz = ncpu = None
    pre, post = [], []
    for line in path.read_text().splitlines():
        f = line.split()
        if f[0] == "hz":
            hz, ncpu = int(f[1]), int(f[2])
        elif f[0] in ("pre", "post") and len(f) >= 10 and f[1] == "cpu":
            v = [int(x) for x in f[2:10]]
            busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
            (pre if f[0] == "pre" else post).append((busy, busy + v[3] + v[4]))
    if not (hz and pre and post):
        return None
    return max(post)[0] - min(pre)[0], max(post)[1] - min(pre)[1], hz, ncpu


def job_result(job, cpu):
    """One job of a fio run as a dict; raises ValueError on a job error."""
    if job.get("error"):
        raise ValueError(f"fio job error {job['error']}")
    rd, wr = job["read"], job["write"]
    ios = rd["total_ios"] + wr["total_ios"]
    if not ios:
        raise ValueError("no I/O done")
    # Every job here reads or writes, never both: latency from the side that did I/O.
    side = rd if rd["total_ios"] >= wr["total_ios"] else wr
    pct = side["clat_ns"].get("percentile", {})
    r = {
        "iops": rd["iops"] + wr["iops"],
        "mib_s": (rd["bw_bytes"] + wr["bw_bytes"]) / 2**20,
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "ios": ios,
        "cpu_us_per_io": None,
        "busy_vcpus": None,
    }
    if cpu:
        busy, total, hz, ncpu = cpu
        r["cpu_us_per_io"] = busy / hz * 1e6 / ios
        # The cpu line sums every CPU: busy/total is a share of all of them.
        r["busy_vcpus"] = busy / total * ncpu if total else None
    return r


def stats(runs):
    if not runs:
        return None

    def med(k):
        vals = [r[k] for r in runs if r[k] is not None]
        return statistics.median(vals) if vals else None

    iops = [r["iops"] for r in runs]
    mib = [r["mib_s"] for r in runs]
    p99 = [r["p99_us"] for r in runs]
    return {
        "n": len(runs),
        "iops": iops, "iops_median": statistics.median(iops), "iops_min": min(iops), "iops_max": max(iops),
        "mib_s_median": statistics.median(mib), "mib_s_min": min(mib), "mib_s_max": max(mib),
        "p50_us_median": med("p50_us"), "p99_us_median": med("p99_us"),
        "p99_us_min": min(p99), "p99_us_max": max(p99),
        "cpu_us_per_io": med("cpu_us_per_io"), "busy_vcpus": med("busy_vcpus"),
    }


def ratio(a, b):
    return a["iops_median"] / b["iops_median"] if a and b and b["iops_median"] else None


def paired(ub, other):
    """userblk IOPS / other's IOPS per repeat, in repeat order."""
    by_rep = {r["repeat"]: r["iops"] for r in other}
    return [u["iops"] / by_rep[u["repeat"]] for u in ub if by_rep.get(u["repeat"])]


def tsv(path):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def med(vals):
    return statistics.median(vals) if vals else None


def fmt_ratio(r):
    return f"{r:.2f}" if r is not None else "-"


def num(v, digits=0):
    return "-" if v is None else f"{v:.{digits}f}"


def main(out):
    out = Path(out)
    workloads = tsv(out / "workloads.tsv")
    labels = {(d["class"], d["queues"], d["side"]): (d["disk"], d["label"]) for d in tsv(out / "devices.tsv")}
    order = {(o["key"], o["side"], o["repeat"]): int(o["position"]) for o in tsv(out / "order.tsv")} \
        if (out / "order.tsv").exists() else {}

    rows, runs_csv, problems = [], [], []
    for w in workloads:
        sides = {}
        runs = {side: [] for side in SIDES}
        for p in sorted(out.glob(f"raw/{w['key']}.*.json"), key=lambda p: int(p.name.split(".")[-2])):
            rep = p.name.split(".")[-2]
            try:
                jobs = {j["jobname"]: j for j in load(p)["jobs"]}
            except (ValueError, KeyError, OSError) as e:
                problems.append(f"{p.name}: {e}")
                continue
            for side in SIDES:
                job = jobs.get(f"{w['key']}-{side}")
                if job is None:
                    problems.append(f"{p.name}: no job for {side}")
                    continue
                try:
                    r = job_result(job, cpu_window(out / "raw" / f"{w['key']}.{side}.{rep}.cpu"))
                except (ValueError, KeyError) as e:
                    problems.append(f"{p.name} {side}: {e}")
                    continue
                r["repeat"] = rep
                runs[side].append(r)
                runs_csv.append({"workload": w["key"], "side": side, "repeat": rep,
                                 "position": order.get((w["key"], side, rep), ""),
                                 **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()},
                                 "json": str(p.relative_to(out))})
        sides = {side: stats(runs[side]) for side in SIDES}
        disk, label = {}, {}
        for side in SIDES:
            disk[side], label[side] = labels.get((w["class"], w["jobs"], side), ("?", side))
        rows.append({
            "key": w["key"], "class": w["class"], "title": w["title"], "jobs": int(w["jobs"]),
            "fio": w["fio"], "disk": disk, "label": label, "sides": sides,
            "userblk_over_rublk": ratio(sides["userblk"], sides["rublk"]),
            "userblk_over_kernel": ratio(sides["userblk"], sides["kernel"]),
            # The same ratios within each repeat: the three jobs of a repeat
            # ran back to back, so slow drift of the host cancels in them.
            "paired_over_rublk": paired(runs["userblk"], runs["rublk"]),
            "paired_over_kernel": paired(runs["userblk"], runs["kernel"]),
        })

    # 2 jobs on 2 queues against 1 job on 1 queue, same job otherwise.
    scaling = []
    by_key = {r["key"]: r for r in rows}
    for r in rows:
        if r["key"].endswith("-2j") and r["key"][:-3] in by_key:
            base = by_key[r["key"][:-3]]
            scaling.append({"key": r["key"], "title": f"{r['class']} {base['title']}",
                            **{s: ratio(r["sides"][s], base["sides"][s]) for s in SIDES}})

    env = (out / "env.txt").read_text().splitlines() if (out / "env.txt").exists() else []
    host = (out / "host.txt").read_text().splitlines() if (out / "host.txt").exists() else []
    commands = (out / "commands.txt").read_text().splitlines() if (out / "commands.txt").exists() else []

    summary = {"host": host, "env": env, "commands": commands, "workloads": rows,
               "scaling_2q_over_1q": scaling, "problems": problems}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_csv(out, rows, runs_csv)
    text = report(rows, scaling, host, env, commands, problems)
    (out / "summary.txt").write_text(text)
    print(text, end="")
    return 1 if problems else 0


def write_csv(out, rows, runs_csv):
    cols = ["class", "workload", "title", "jobs_and_queues", "side", "label", "disk", "runs",
            "iops_median", "iops_min", "iops_max", "mib_s_median", "mib_s_min", "mib_s_max",
            "p50_us_median", "p99_us_median", "p99_us_min", "p99_us_max",
            "cpu_us_per_io_median", "busy_vcpus_median", "userblk_over_this", "userblk_over_this_paired"]
    with open(out / "summary.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(cols)
        for r in rows:
            u = r["sides"]["userblk"]
            for side in SIDES:
                s = r["sides"][side]
                if s is None:
                    wr.writerow([r["class"], r["key"], r["title"], r["jobs"], side, r["label"][side],
                                 r["disk"][side], 0] + [""] * (len(cols) - 8))
                    continue
                rt = ratio(u, s)
                pr = {"userblk": 1.0, "rublk": med(r["paired_over_rublk"]),
                      "kernel": med(r["paired_over_kernel"])}[side]
                wr.writerow([r["class"], r["key"], r["title"], r["jobs"], side, r["label"][side], r["disk"][side],
                             s["n"], round(s["iops_median"]), round(s["iops_min"]), round(s["iops_max"]),
                             round(s["mib_s_median"], 1), round(s["mib_s_min"], 1), round(s["mib_s_max"], 1),
                             num(s["p50_us_median"], 1), num(s["p99_us_median"], 1),
                             num(s["p99_us_min"], 1), num(s["p99_us_max"], 1),
                             num(s["cpu_us_per_io"], 1), num(s["busy_vcpus"], 2),
                             "" if rt is None else round(rt, 3), "" if pr is None else round(pr, 3)])
    if runs_csv:
        with open(out / "runs.csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(runs_csv[0].keys()))
            wr.writeheader()
            wr.writerows(runs_csv)


def spread(s, key, digits=0):
    return f"{s[key + '_median']:.{digits}f} ({s[key + '_min']:.{digits}f}-{s[key + '_max']:.{digits}f})"


def report(rows, scaling, host, env, commands, problems):
    L = []
    L += host
    if host:
        L.append("")
    L.append("overview: median IOPS of each device, ratios of medians (> 1: userblk ahead)")
    L.append(f"{'workload':<34} {'userblk':>9} {'rublk':>9} {'kernel':>9}  {'u/rublk':>7} {'u/kernel':>8}  "
             f"{'paired':>13}   {'CPU us/IO u / r / k':>22}")
    for r in rows:
        s = r["sides"]
        cpu = " / ".join(num(s[x]["cpu_us_per_io"], 1) if s[x] else "-" for x in SIDES)
        L.append(f"{r['class'] + ' ' + r['title']:<34} "
                 + " ".join(f"{s[x]['iops_median']:>9.0f}" if s[x] else f"{'-':>9}" for x in SIDES)
                 + f"  {fmt_ratio(r['userblk_over_rublk']):>7} {fmt_ratio(r['userblk_over_kernel']):>8}  "
                 + f"{fmt_ratio(med(r['paired_over_rublk'])) + ' / ' + fmt_ratio(med(r['paired_over_kernel'])):>13}   {cpu:>22}")
    L.append("kernel = null_blk for null, loop with direct I/O for file. paired: median over the repeats")
    L.append("of userblk/rublk and userblk/kernel within one repeat (jobs run back to back; less drift).")
    if scaling:
        L.append("")
        L.append("scaling: 2 jobs on 2 queues / 1 job on 1 queue (median IOPS; loop has one queue)")
        for sc in scaling:
            L.append(f"  {sc['title']:<32} " + "  ".join(f"{x} {fmt_ratio(sc[x])}" for x in SIDES))
    for r in rows:
        L.append("")
        q = "1 queue" if r["jobs"] == 1 else f"{r['jobs']} queues"
        L.append(f"== {r['class']}: {r['title']} ({r['jobs']} job{'s' if r['jobs'] > 1 else ''}, {q})")
        L.append(f"   {'device':<23} {'IOPS median (min-max)':<26} {'MiB/s median (min-max)':<26} "
                 f"{'p50 us':>8} {'p99 us':>8}  {'CPU us/IO (vCPUs)':<18}")
        for side in SIDES:
            s = r["sides"][side]
            name = f"{r['label'][side]} ({r['disk'][side]})"
            if s is None:
                L.append(f"   {name:<23} no data")
                continue
            cpu = "-" if s["cpu_us_per_io"] is None else f"{s['cpu_us_per_io']:.1f} ({s['busy_vcpus']:.2f})"
            L.append(f"   {name:<23} {spread(s, 'iops'):<26} {spread(s, 'mib_s', 1):<26} "
                     f"{num(s['p50_us_median']):>8} {num(s['p99_us_median']):>8}  {cpu:<18}")
        L.append(f"   userblk/rublk {fmt_ratio(r['userblk_over_rublk'])}   "
                 f"userblk/kernel {fmt_ratio(r['userblk_over_kernel'])}   (median IOPS; runs per device: "
                 + ", ".join(str(r['sides'][x]['n']) if r['sides'][x] else "0" for x in SIDES) + ")")
        L.append("   per repeat: userblk/rublk " + " ".join(f"{v:.2f}" for v in r["paired_over_rublk"])
                 + ", userblk/kernel " + " ".join(f"{v:.2f}" for v in r["paired_over_kernel"]))
    L.append("")
    L.append("Medians over the repeats, (min-max) across them; p50/p99: fio completion latency, median of")
    L.append("the repeats. CPU us/IO: busy time of all guest CPUs during the run / I/Os done; vCPUs: how")
    L.append("many of the guest's CPUs that kept busy on average. Absolute figures are qemu TCG figures;")
    L.append("only ratios from the same boot mean something.")
    if problems:
        L.append("")
        L.append("runs left out:")
        L += [f"  {p}" for p in problems]
    L.append("")
    L.append("commands:")
    L += [f"  {c}" if c else "" for c in commands]
    L.append("")
    L.append("guest:")
    L += [f"  {e}" for e in env]
    return "\n".join(line.rstrip() for line in L) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 2 and not sys.argv[1].startswith("-"):
        sys.exit(main(sys.argv[1]))
    else:
        raise SystemExit(__doc__)
