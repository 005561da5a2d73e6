#!/usr/bin/python3
"""Plots the CSV of `kvdex bench recall --sweep --csv FILE` as recall@k against the
percentage of keys touched (log x), one line per index (kind and build parameters),
the exact scan as a reference point at 100%.

Usage: /usr/bin/python3 bench/plot_recall.py sweep.csv recall.png [--title TEXT] [--k K]
Needs Debian's python3-matplotlib (Agg backend: no display)."""
import argparse
import csv
import re
import sys
from collections import OrderedDict


def load(path):
    rows = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"kind", "spec", "knob", "value", "recall", "touched_frac", "qps"}
        missing = need - set(reader.fieldnames or [])
        if missing:
            sys.exit(f"plot_recall: {path}: missing columns {sorted(missing)} "
                     "(expected the CSV of `kvdex bench recall --csv`)")
        for r in reader:
            rows.append(dict(kind=r["kind"], spec=r["spec"], knob=r["knob"],
                             value=int(r["value"]), recall=float(r["recall"]),
                             touched=float(r["touched_frac"]), qps=float(r["qps"])))
    if not rows:
        sys.exit(f"plot_recall: {path}: no rows")
    return rows


def label(kind, spec, knob):
    """The spec without the swept knob (it varies along the line) and without notes."""
    spec = spec.split(" (")[0]
    if knob and knob != "none":
        spec = re.sub(r"([:,])%s=\d+,?" % re.escape(knob), r"\1", spec).rstrip(",:")
    if len(spec) > 48:  # long specs (graph's) would cover the plot: the kind and what differs
        spec = kind + " (defaults)" if ":" in spec else spec[:48]
    return spec if spec != kind else kind


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("png")
    ap.add_argument("--title", default=None)
    ap.add_argument("--k", default=None, help="k of recall@k, for the axis label")
    a = ap.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load(a.csv)
    lines = OrderedDict()
    for r in rows:
        lines.setdefault((r["kind"], r["spec"]), []).append(r)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for (kind, spec), pts in lines.items():
        pts.sort(key=lambda r: (r["touched"], r["value"]))
        xs = [max(100.0 * r["touched"], 1e-4) for r in pts]
        ys = [r["recall"] for r in pts]
        name = label(kind, spec, pts[0]["knob"])
        if len(pts) == 1:
            ax.plot(xs, ys, marker="*" if kind == "exact" else "o", markersize=10,
                    linestyle="none", label=name)
        else:
            ax.plot(xs, ys, marker="o", markersize=3.5, label=f"{name} ({pts[0]['knob']})")
    ax.set_xscale("log")
    ax.set_xlabel("keys touched per query (% of all keys, log scale)")
    ax.set_ylabel(f"recall@{a.k}" if a.k else "recall@k")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(a.title or "recall vs keys touched (kvdex bench recall --sweep)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(a.png)
    print(f"plot_recall: wrote {a.png} ({len(lines)} lines, {len(rows)} points)")


if __name__ == "__main__":
    main()
