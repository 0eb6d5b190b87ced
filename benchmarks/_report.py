"""Aggregation and output of the benchmark: per-cell medians, the text tables, the JSON
payload and the plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import Rep

STATS = (
    *("rate", "mb_s", "p50_us", "p99_us", "p999_us"),
    *("per_sync", "cpu_us", "peak_rss_mib", "rss_delta_mib"),
)


@dataclass(frozen=True, order=True)
class Group:
    """Cells measured together, implementations interleaved: one workload, size and N."""

    workload: str  # "append" or "many"
    size: int
    n: int


@dataclass
class Cell:
    """All repetitions of one implementation in one group, plus the summary."""

    impl: str
    group: Group
    reps: list[Rep] = field(default_factory=list)
    skipped: str | None = None

    def median(self, attr: str) -> float | None:
        """Median of a Rep attribute across repetitions (None if no values)."""
        vals = [v for r in self.reps if (v := getattr(r, attr)) is not None]
        return statistics.median(vals) if vals else None

    @property
    def rate(self) -> float:
        return self.median("rate") or 0.0

    @property
    def threads(self) -> int | None:
        return self.reps[0].threads if self.reps else None

    def to_json(self) -> dict[str, Any]:
        return {
            "impl": self.impl,
            **asdict(self.group),
            "skipped": self.skipped,
            "threads": self.threads,
            "median": {k: self.median(k) for k in STATS},
            "min_rate": min((r.rate for r in self.reps), default=None),
            "max_rate": max((r.rate for r in self.reps), default=None),
            "reps": [asdict(r) for r in self.reps],
        }


Cells = dict[tuple[Group, str], Cell]


def size_label(size: int) -> str:
    """100 -> '100 B', 4096 -> '4 KiB'."""
    return f"{size >> 10} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def _num(x: float | None) -> str:
    """Compact number: 3 significant digits below 100, thousands separators above."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if x >= 0.01 else f"{x:.1e}"


def ratio(num: Cell | None, den: Cell | None) -> str:
    """num's median rate over den's, formatted ('-' if either is missing)."""
    if num is None or den is None or not num.reps or not den.reps or den.rate == 0:
        return "-"
    r = num.rate / den.rate
    return f"{r:.0f}x" if r >= 100 else f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


def spread(cell: Cell) -> str:
    """min and max rate relative to the median, e.g. '-4/+2%'."""
    rates = [r.rate for r in cell.reps]
    med = cell.rate
    if not med or len(rates) < 2:
        return "-"
    lo, hi = (round((x / med - 1) * 100) for x in (min(rates), max(rates)))
    return f"{lo:+d}/{hi:+d}%".replace("+0/", "0/").replace("-0/", "0/").replace("/+0%", "/0%")


def section_title(workload: str, size: int, many_batch: int) -> str:
    if workload == "append":
        return (
            f"## append, {size_label(size)} records: N writers each awaiting one append at a time"
        )
    return (
        f"## append_many, {size_label(size)} records: N writers each awaiting one batch of "
        f"{many_batch} records (latency per batch)"
    )


HEAD = (
    f"{'impl':<20} {'N':>5} {'rec/s':>11} {'spread':>8} {'MB/s':>7} {'p50 us':>9} "
    f"{'p99 us':>9} {'p999 us':>9} {'rec/sync':>8} {'CPU us':>7} {'dRSS':>6} {'x raw':>7}"
)


def render(cells: Cells, groups: Sequence[Group], impls: Sequence[str], many_batch: int) -> str:
    """One fixed-width table per (workload, size), one row per implementation per N."""
    out: list[str] = []
    section: tuple[str, int] | None = None
    for g in groups:
        if (g.workload, g.size) != section:
            section = (g.workload, g.size)
            out += ["", section_title(g.workload, g.size, many_batch), HEAD, "-" * len(HEAD)]
        elif out and out[-1] != "":
            out.append("")
        for impl in impls:
            c = cells.get((g, impl))
            if c is None:
                continue
            if c.skipped or not c.reps:
                out.append(f"{impl:<20} {g.n:>5}   skipped: {c.skipped or 'no result'}")
                continue
            out.append(
                f"{impl:<20} {g.n:>5} {c.rate:>11,.0f} {spread(c):>8} "
                f"{_num(c.median('mb_s')):>7} {_fmt(c.median('p50_us')):>9} "
                f"{_fmt(c.median('p99_us')):>9} {_fmt(c.median('p999_us')):>9} "
                f"{_num(c.median('per_sync')):>8} {_num(c.median('cpu_us')):>7} "
                f"{_fmt(c.median('rss_delta_mib'), '.1f'):>6} "
                f"{ratio(c, cells.get((g, 'raw'))):>7}"
            )
    return "\n".join(out).strip("\n")


LEGEND = (
    "# columns: rec/s = median of the repetitions' durable records/s; spread = slowest and "
    "fastest repetition vs that median; MB/s = record payload (10^6 B/s); p50/p99/p999 = "
    "median over repetitions of each repetition's latency percentile of one op; rec/sync = "
    "records per fdatasync (walasync: records per durable batch, counted by an I/O layer "
    "(walasync.FileIO subclass); raw: per batch; rocksdb: WAL writes per sync from rocksdb.stats x "
    "records per write; per-record, sqlite3, lmdb: records per commit, by construction; an "
    "lmdb commit is 2 syncs); CPU us = process user+sys CPU (all threads) per record over the "
    "timed window; dRSS = peak RSS (MiB) of the repetition's own process minus its peak just "
    "before the implementation started (after imports; absolute peaks are in the JSON); "
    "x raw = rec/s over raw's at the same N."
)


def target_lines(cells: Cells, groups: Sequence[Group], impl: str = "walasync-uvloop") -> str:
    """For ``impl`` with 100 B appends: its rate as a multiple of raw's and RocksDB's."""
    parts = []
    for g in groups:
        if g.workload != "append" or g.size != 100 or (g, impl) not in cells:
            continue
        me = cells[(g, impl)]
        parts.append(
            f"N={g.n}: {ratio(me, cells.get((g, 'raw')))} raw, "
            f"{ratio(me, cells.get((g, 'rocksdb')))} rocksdb"
        )
    return f"# targets: {impl}, 100 B appends: " + ("; ".join(parts) if parts else "not run")


def baseline_lines(cells: Cells, groups: Sequence[Group], impl: str = "walasync-uvloop") -> str:
    """For each group: ``impl`` against walasync-baseline, as the median (and range) of the
    ratios of repetitions run back to back (rate, and CPU per record)."""
    out = []
    for g in groups:
        me, base = cells.get((g, impl)), cells.get((g, "walasync-baseline"))
        if me is None or base is None:
            continue
        pairs = list(zip(me.reps, base.reps, strict=False))
        parts = [f"# baseline: {g.workload} {size_label(g.size)} N={g.n}, {len(pairs)} pairs:"]
        for attr, what in (("rate", "rec/s"), ("cpu_us", "CPU us/record")):
            ratios = sorted(
                a / b
                for ra, rb in pairs
                if (a := getattr(ra, attr)) is not None and (b := getattr(rb, attr))
            )
            if ratios:
                med = statistics.median(ratios)
                parts.append(f"{what} x{med:.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f})")
        out.append(" ".join(parts))
    return "\n".join(out) if out else "# baseline: no pairs"


def plot(cells: Cells, impls: Sequence[str], path: str, title: str) -> str | None:
    """records/s and p99 latency against N (log-log), 100 B appends; None or why skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    series: dict[str, list[Cell]] = {}
    for (g, impl), c in cells.items():
        if g.workload == "append" and g.size == 100 and c.reps:
            series.setdefault(impl, []).append(c)
    if not series:
        return "no 100 B append results to plot"
    fig, (ax_rate, ax_p99) = plt.subplots(1, 2, figsize=(13, 5.2), layout="constrained")
    markers = "osD^v<>ph*"
    ns: set[int] = set()
    for i, impl in enumerate(i for i in impls if i in series):
        cs = sorted(series[impl], key=lambda c: c.group.n)
        x = [c.group.n for c in cs]
        ns.update(x)
        rate = [c.rate for c in cs]
        err = [
            [c.rate - min(r.rate for r in c.reps) for c in cs],
            [max(r.rate for r in c.reps) - c.rate for c in cs],
        ]
        style: dict[str, Any] = {"marker": markers[i % len(markers)], "label": impl}
        if impl.startswith("walasync"):
            style["linewidth"] = 2.5
        else:
            style["linestyle"] = "--"
        line = ax_rate.errorbar(x, rate, yerr=err, capsize=3, **style)
        p99 = [(c.group.n, p / 1e3) for c in cs if (p := c.median("p99_us")) is not None]
        ax_p99.plot(
            [n for n, _ in p99], [ms for _, ms in p99], color=line.lines[0].get_color(), **style
        )
    for ax, ylabel in ((ax_rate, "durable records/s"), (ax_p99, "p99 append latency (ms)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted(ns), [str(n) for n in sorted(ns)])
        ax.minorticks_off()
        ax.set_xlabel("concurrent writers N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.35)
    rates = [r.rate for cs in series.values() for c in cs for r in c.reps]
    ax_rate.set_yticks([10**k for k in range(1, 10)])
    ax_rate.set_ylim(min(rates) / 2, max(rates) * 2)
    ax_rate.set_title("throughput (min-max bars over repetitions)")
    ax_p99.set_title("p99 latency")
    ax_rate.legend(loc="upper left", fontsize=9)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def payload(
    info: dict[str, Any],
    config: dict[str, Any],
    cells: Cells,
    notes: list[str],
    elapsed: float,
) -> dict[str, Any]:
    """Everything, for --json."""
    return {
        "machine": info,
        "config": config,
        "elapsed_s": elapsed,
        "notes": notes,
        "cells": [c.to_json() for c in cells.values()],
    }


def write_json(path: str, data: dict[str, Any]) -> None:
    import json

    Path(path).write_text(json.dumps(data, indent=2) + "\n")
