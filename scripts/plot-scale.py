#!/usr/bin/env python3
"""Draws docs/scale.png from docs/scale.csv (written by scripts/scale-curve) and prints the extrapolation.

    python3 scripts/plot-scale.py                       # docs/scale.csv -> docs/scale.png
    python3 scripts/plot-scale.py --csv other.csv --png other.png

The plot: wsgate's RSS (MiB) against sessions held, the least-squares line through the points, and the KiB per
session at each count on a second axis. The extrapolation fits RSS = fixed + slope x sessions (least squares) and
gives, for 100 000 and 1 000 000 sessions, wsgate's memory, the descriptors it needs (2 per session and those it
held beyond that in the run) and the kernel limits to raise for them.

Only dependency: matplotlib (`pip install matplotlib`); the rest is Python 3's standard library.
"""

import argparse
import csv
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = (100_000, 1_000_000)
# Linux defaults a user raises against.
DEFAULT_NR_OPEN = 1_048_576
DEFAULT_PORTS = 60_999 - 32_768 + 1  # net.ipv4.ip_local_port_range "32768 60999"
WIDEST_PORTS = 65_535 - 1_024 + 1  # "1024 65535"


def fit(xs, ys):
    """Least-squares line y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def human_kib(kib):
    return f"{kib / 1024 ** 2:.1f} GiB" if kib >= 1024 ** 2 else f"{kib / 1024:.0f} MiB"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", default=os.path.join(ROOT, "docs", "scale.csv"))
    p.add_argument("--png", default=os.path.join(ROOT, "docs", "scale.png"))
    args = p.parse_args()
    with open(args.csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["established"]) > 0]
    if len(rows) < 2:
        raise SystemExit("plot-scale: at least two session counts are needed for a line")
    n = [int(r["established"]) for r in rows]
    rss = [int(r["rss_held_kib"]) for r in rows]
    per = [float(r["kib_per_session"]) for r in rows]
    fixed, slope = fit(n, rss)
    extra_fds = max(int(r["fds_held"]) - 2 * int(r["established"]) for r in rows)
    slab = [float(r["slab_kib_per_session_4_sockets"]) for r in rows if r.get("slab_kib_per_session_4_sockets")]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(n, [k / 1024 for k in rss], "o", color="tab:blue", label="RSS with the sessions held")
    ends = [0, max(n)]
    ax.plot(ends, [(fixed + slope * x) / 1024 for x in ends], "-", color="tab:blue", alpha=0.5,
            label=f"least squares: {fixed / 1024:.1f} MiB + {slope:.2f} KiB x sessions")
    ax.set_xlabel("idle WebSocket sessions held")
    ax.set_ylabel("wsgate RSS (MiB)")
    ax.set_xlim(0, max(n) * 1.05)
    ax.set_ylim(0, max(rss) / 1024 * 1.15)
    ax.grid(True, alpha=0.3)
    right = ax.twinx()
    right.plot(n, per, "s--", color="tab:orange", label="KiB per session (RSS held - RSS before) / sessions")
    right.set_ylabel("KiB per session")
    right.set_ylim(0, max(per) * 1.5)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    ax.set_title("wsgate memory with many idle sessions (one 64 B echo each, frames mode)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.png)
    print(f"{args.png}: {len(rows)} points")

    print(f"\nLeast squares over {len(rows)} counts ({min(n):,}..{max(n):,}): "
          f"RSS = {fixed / 1024:.1f} MiB + {slope:.2f} KiB x sessions")
    if slab:
        print(f"Kernel slab per session on this machine, all four sockets (client, wsgate's two, backend): "
              f"{min(slab):.1f}..{max(slab):.1f} KiB, so about {sum(slab) / len(slab) / 2:.0f} KiB for wsgate's two")
    print("\n| sessions | wsgate RSS | descriptors (nofile) | fs.nr_open | backend addresses (ports 32768-60999 / 1024-65535) |")
    print("|---|---|---|---|---|")
    for target in TARGETS:
        fds = 2 * target + extra_fds
        nr_open = "default 1048576 is enough" if fds <= DEFAULT_NR_OPEN else f"raise to at least {fds:,}"
        backends = f"{-(-target // DEFAULT_PORTS)} / {-(-target // WIDEST_PORTS)}"
        print(f"| {target:,} | {human_kib(fixed + slope * target)} | {fds:,} | {nr_open} | {backends} |")
    print(f"\nDescriptors: 2 per session plus the {extra_fds} wsgate held besides in the run (listeners, event loops, "
          "standard streams); fs.file-max must cover them and every other process's on the machine. Each backend "
          "address (IP and port) gives wsgate one local port range of connections to it.")


if __name__ == "__main__":
    main()
