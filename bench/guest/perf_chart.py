#!/usr/bin/env python3
"""Draw bench/perf.sh's chart from OUT/summary.json (written by perf_summary.py).

    perf_chart.py OUT [PNG]      PNG defaults to OUT/perf.png

One panel per device class (null, file). For every workload, three bars:
userblk, rublk and the kernel driver's median IOPS, each divided by the
kernel's median (so the kernel is 1.0), with the min-max of the repeats as
error bars. The kernel's absolute median IOPS is under each workload's name
and userblk/kernel above userblk's bar. Runs on the host (needs matplotlib:
Debian's python3-matplotlib).
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)

SIDES = ("userblk", "rublk", "kernel")
COLOURS = {"userblk": "#1f77b4", "rublk": "#ff7f0e", "kernel": "#7f7f7f"}


def kilo(v):
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def panel(ax, rows, cls):
    rows = [r for r in rows if r["class"] == cls]
    width = 0.27
    labels = {}
    for i, side in enumerate(SIDES):
        xs, ys, lo, hi = [], [], [], []
        for x, r in enumerate(rows):
            s, k = r["sides"][side], r["sides"]["kernel"]
            if not s or not k or not k["iops_median"]:
                continue
            base = k["iops_median"]
            y = s["iops_median"] / base
            xs.append(x + (i - 1) * width)
            ys.append(y)
            lo.append(y - s["iops_min"] / base)
            hi.append(s["iops_max"] / base - y)
            labels[side] = r["label"][side]
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=COLOURS[side],
               label=labels.get(side, side), error_kw={"elinewidth": 0.8})
        if side == "userblk":
            for x, y, h in zip(xs, ys, hi):
                ax.text(x, y + h + 0.02, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.6, linestyle="--")
    ax.set_ylim(0, max(1.2, ax.get_ylim()[1] * 1.08))
    ticks = []
    for r in rows:
        k = r["sides"]["kernel"]
        ticks.append(r["title"].replace(" 2 jobs", "\n2 jobs/2 queues")
                     + f"\n(kernel {kilo(k['iops_median'])} IOPS)" if k else r["title"])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(ticks, fontsize=7)
    kernel = "null_blk" if cls == "null" else "loop with direct I/O"
    ax.set_ylabel(f"IOPS / {kernel}'s IOPS")
    ax.set_title(f"{cls}: userblk and rublk against {kernel} (median, min-max of repeats)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    ax.grid(axis="y", linewidth=0.3)


def main(out, png):
    summary = json.loads((Path(out) / "summary.json").read_text())
    rows = summary["workloads"]
    classes = [c for c in ("null", "file") if any(r["class"] == c for r in rows)]
    fig, axes = plt.subplots(len(classes), 1, figsize=(15, 5.2 * len(classes)), squeeze=False)
    for ax, cls in zip(axes[:, 0], classes):
        panel(ax, rows, cls)
    head = "\n".join(summary.get("host", [])[:2]) or "userblk perf"
    fig.suptitle(head + "\nqemu TCG: absolute IOPS mean little; the ratios from one boot do", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"chart: {png}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1].startswith("-"):
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else str(Path(sys.argv[1]) / "perf.png"))
