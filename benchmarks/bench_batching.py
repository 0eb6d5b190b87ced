"""Batching-throughput benchmark: walasync group commit vs per-record fsync vs the raw disk.

For each concurrency level N (default 1, 16, 256, 1024) and 100-byte records, measures
appends/s and p50/p99 append latency for:

* ``walasync-asyncio`` / ``walasync-uvloop``: N coroutines looping on ``await wal.append(rec)``.
* ``per-record``: N threads (capped at 256), each doing ``os.pwrite`` + ``os.fdatasync`` per
  record under one ``threading.Lock``: durability without group commit.
* ``raw``: one thread doing ``os.pwritev`` of N pre-built frames + ``os.fdatasync`` per batch:
  the disk's limit with no per-record work (a record's latency is its batch's call time).

Like walasync inside its zero-filled segments, both baselines overwrite a preallocated,
synced 16 MiB ring (so fdatasync need not update the file size); ``--append`` makes them append
to a growing file instead, as a naive implementation would.

Each cell is repeated ``--repeats`` times, implementations interleaved, each repetition on a
fresh log/file after a short warm-up. Only operations completing inside the timed window count.

Usage::

    PYTHONPATH=. python benchmarks/bench_batching.py            # quick, < 60 s
    PYTHONPATH=. python benchmarks/bench_batching.py --full     # ~3 s per cell, < 10 min
    python benchmarks/bench_batching.py --impl raw,per-record --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RECORD_SIZE = 100
MAX_THREADS = 256
RING_SIZE = 16 << 20
IMPLS = ("walasync-asyncio", "walasync-uvloop", "per-record", "raw")
QUICK = {"duration": 0.6, "warmup": 0.15, "repeats": 3}
FULL = {"duration": 3.0, "warmup": 0.5, "repeats": 3}

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class Skip(Exception):
    """Raised when an implementation cannot run here (e.g. uvloop missing)."""


@dataclass
class Window:
    """Timed window in perf_counter_ns: warm-up runs before ``start``; work stops at ``end``."""

    start: int
    end: int

    @classmethod
    def after(cls, warmup: float, duration: float) -> Window:
        """Window beginning ``warmup`` seconds from now and lasting ``duration`` seconds."""
        start = time.perf_counter_ns() + int(warmup * 1e9)
        return cls(start, start + int(duration * 1e9))


@dataclass(frozen=True)
class Params:
    """Per-repetition settings shared by every implementation."""

    duration: float
    warmup: float
    append: bool = False
    segment_size: int | None = None

    def window(self) -> Window:
        """A fresh timed window starting after the warm-up."""
        return Window.after(self.warmup, self.duration)


@dataclass
class Rep:
    """One repetition of one cell."""

    records: int
    seconds: float
    rate: float
    p50_us: float | None
    p90_us: float | None
    p99_us: float | None
    max_us: float | None
    threads: int | None = None


@dataclass
class Cell:
    """All repetitions of one (implementation, N) cell, plus the summary."""

    impl: str
    n: int
    reps: list[Rep] = field(default_factory=list)
    skipped: str | None = None

    @property
    def rate(self) -> float:
        """Median records/s across repetitions."""
        return statistics.median(r.rate for r in self.reps)

    def median_of(self, attr: str) -> float | None:
        """Median of a latency attribute across repetitions (None if no samples)."""
        vals = [v for r in self.reps if (v := getattr(r, attr)) is not None]
        return statistics.median(vals) if vals else None


def percentile(sorted_ns: Sequence[int], q: float) -> float | None:
    """Nearest-rank percentile of sorted nanosecond samples, in microseconds."""
    if not sorted_ns:
        return None
    return sorted_ns[max(0, math.ceil(q * len(sorted_ns)) - 1)] / 1e3


def make_rep(lat_ns: list[int], win: Window, weight: int = 1, threads: int | None = None) -> Rep:
    """Summarise latency samples (each standing for ``weight`` records) over ``win``."""
    lat_ns.sort()
    seconds = (win.end - win.start) / 1e9
    records = len(lat_ns) * weight
    return Rep(
        records=records,
        seconds=seconds,
        rate=records / seconds,
        p50_us=percentile(lat_ns, 0.50),
        p90_us=percentile(lat_ns, 0.90),
        p99_us=percentile(lat_ns, 0.99),
        max_us=lat_ns[-1] / 1e3 if lat_ns else None,
        threads=threads,
    )


# --------------------------------------------------------------------------- walasync


def _ensure_walasync_importable() -> None:
    """Put the repository root on sys.path if walasync is not importable as is."""
    if importlib.util.find_spec("walasync") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def uvloop_factory() -> LoopFactory:
    """Return uvloop's loop factory, or raise Skip if uvloop is not installed."""
    try:
        import uvloop
    except ImportError as exc:
        raise Skip("uvloop not installed") from exc
    return uvloop.new_event_loop


async def _walasync_cell(
    path: Path, n: int, record: bytes, prm: Params
) -> tuple[list[int], Window]:
    import walasync

    opts: dict[str, Any] = {} if prm.segment_size is None else {"segment_size": prm.segment_size}
    wal = await walasync.open(path, **opts)
    lat: list[int] = []
    win = prm.window()

    async def worker() -> None:
        append, clock, start, end = wal.append, time.perf_counter_ns, win.start, win.end
        while (t0 := clock()) < end:
            await append(record)
            t1 = clock()
            if start <= t1 < end:
                lat.append(t1 - t0)

    try:
        await asyncio.gather(*(worker() for _ in range(n)))
    finally:
        await wal.close()
    return lat, win


def run_walasync(loop_factory: LoopFactory | None, path: Path, n: int, prm: Params) -> Rep:
    """N coroutines appending to a fresh walasync log on the given event loop."""
    _ensure_walasync_importable()
    record = b"w" * RECORD_SIZE
    loop = (loop_factory or asyncio.new_event_loop)()  # no asyncio.Runner: keep 3.10 support
    try:
        lat, win = loop.run_until_complete(_walasync_cell(path, n, record, prm))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return make_rep(lat, win)


# --------------------------------------------------------------------------- baselines


def open_target(path: Path, append: bool) -> tuple[int, int]:
    """Open a baseline's file; unless ``append``, zero-fill and sync a ring of RING_SIZE bytes.

    Returns (fd, ring size or 0 for append). Overwriting preallocated blocks, as walasync does
    inside its zero-filled segments, lets fdatasync skip the file-size metadata update.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    if append:
        return fd, 0
    zeros = bytes(1 << 20)
    for off in range(0, RING_SIZE, len(zeros)):
        os.pwrite(fd, zeros, off)
    os.fsync(fd)
    return fd, RING_SIZE


def run_per_record(path: Path, n: int, prm: Params) -> Rep:
    """min(N, 256) threads doing write + fdatasync per record under one lock."""
    threads = min(n, MAX_THREADS)
    record = b"p" * RECORD_SIZE
    fd, ring = open_target(path, prm.append)
    offset = 0
    lock = threading.Lock()
    go = threading.Event()
    lats: list[list[int]] = [[] for _ in range(threads)]
    win = Window(0, 0)

    def worker(lat: list[int]) -> None:
        nonlocal offset
        go.wait()
        clock, start, end = time.perf_counter_ns, win.start, win.end
        while (t0 := clock()) < end:
            with lock:
                if clock() >= end:  # don't drain the lock queue past the deadline
                    break
                if ring and offset + RECORD_SIZE > ring:
                    offset = 0
                offset += os.pwrite(fd, record, offset)
                os.fdatasync(fd)
            t1 = clock()
            if start <= t1 < end:
                lat.append(t1 - t0)

    pool = [threading.Thread(target=worker, args=(lat,), daemon=True) for lat in lats]
    try:
        for t in pool:
            t.start()
        w = prm.window()
        win.start, win.end = w.start, w.end
        go.set()
        for t in pool:
            t.join()
    finally:
        os.close(fd)
    return make_rep([x for lat in lats for x in lat], win, threads=threads)


def run_raw(path: Path, n: int, prm: Params) -> Rep:
    """One thread: writev of N pre-built frames + fdatasync per batch."""
    frames = [b"r" * RECORD_SIZE for _ in range(n)]
    iov_max = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
    chunks = [frames[i : i + iov_max] for i in range(0, n, iov_max)]
    fd, ring = open_target(path, prm.append)
    offset, batch = 0, n * RECORD_SIZE
    lat: list[int] = []
    win = prm.window()
    clock, start, end = time.perf_counter_ns, win.start, win.end
    try:
        while (t0 := clock()) < end:
            if ring and offset + batch > ring:
                offset = 0
            for chunk in chunks:
                offset += os.pwritev(fd, chunk, offset)
            os.fdatasync(fd)
            t1 = clock()
            if start <= t1 < end:
                lat.append(t1 - t0)
    finally:
        os.close(fd)
    return make_rep(lat, win, weight=n)


def run_impl(impl: str, path: Path, n: int, prm: Params) -> Rep:
    """Run one repetition of ``impl`` at concurrency ``n`` writing under ``path``."""
    if impl == "walasync-asyncio":
        return run_walasync(None, path, n, prm)
    if impl == "walasync-uvloop":
        return run_walasync(uvloop_factory(), path, n, prm)
    if impl == "per-record":
        return run_per_record(path, n, prm)
    if impl == "raw":
        return run_raw(path, n, prm)
    raise ValueError(impl)


# --------------------------------------------------------------------------- reporting


def fs_type(path: Path) -> str:
    """File-system type and mount point of ``path`` from /proc/mounts ('?' if unknown)."""
    best, kind, real = "", "?", str(path.resolve())
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, kind = mnt, f"{parts[2]} ({parts[0]} on {mnt})"
    return kind


def machine_info(tmp: Path) -> dict[str, Any]:
    """Python, platform, CPU and file-system facts for the header and JSON."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "dir": str(tmp.resolve()),
        "fs": fs_type(tmp),
    }


def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def _ratio(num: Cell, den: Cell | None) -> str:
    if den is None or den is num or not den.reps or not num.reps or den.rate == 0:
        return "-"
    r = num.rate / den.rate
    return f"{r:.0f}x" if r >= 100 else f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


def render(cells: dict[tuple[str, int], Cell], impls: list[str], ns: list[int]) -> str:
    """Fixed-width results table, one row per implementation per N."""
    head = (
        f"{'impl':<17} {'N':>5} {'rec/s':>11} {'spread (min-max)':>23} "
        f"{'p50 us':>9} {'p99 us':>9} {'x per-rec':>10} {'x raw':>7}"
    )
    out = [head, "-" * len(head)]
    for n in ns:
        for impl in impls:
            c = cells.get((impl, n))
            if c is None:
                continue
            if c.skipped or not c.reps:
                out.append(f"{impl:<17} {n:>5}   skipped: {c.skipped}")
                continue
            rates = [r.rate for r in c.reps]
            spread = f"{min(rates):,.0f}-{max(rates):,.0f}"
            out.append(
                f"{impl:<17} {n:>5} {c.rate:>11,.0f} {spread:>23} "
                f"{_fmt(c.median_of('p50_us')):>9} {_fmt(c.median_of('p99_us')):>9} "
                f"{_ratio(c, cells.get(('per-record', n))):>10} "
                f"{_ratio(c, cells.get(('raw', n))):>7}"
            )
        out.append("")
    return "\n".join(out).rstrip()


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="full", action="store_false", help="quick run (default)")
    mode.add_argument("--full", dest="full", action="store_true", help="~3 s per cell")
    p.set_defaults(full=False)
    p.add_argument("--concurrency", default="1,16,256,1024", help="comma-separated N values")
    p.add_argument("--duration", type=float, help="timed seconds per cell repetition")
    p.add_argument("--warmup", type=float, help="untimed warm-up seconds per repetition")
    p.add_argument("--repeats", type=int, help="repetitions per cell")
    p.add_argument(
        "--impl",
        default=",".join(IMPLS),
        help=f"comma-separated subset of {', '.join(IMPLS)} ('walasync' = both loops)",
    )
    p.add_argument("--dir", default=".bench-tmp", help="parent dir for temp files (real disk)")
    p.add_argument(
        "--append",
        action="store_true",
        help="baselines append to a growing file instead of overwriting a preallocated one",
    )
    p.add_argument("--segment-size", type=int, help="walasync segment_size in bytes")
    p.add_argument("--json", metavar="PATH", help="write all raw numbers to PATH")
    return p.parse_args(argv)


def select_impls(spec: str) -> list[str]:
    """Expand and validate the --impl filter, keeping canonical order."""
    wanted: set[str] = set()
    for name in filter(None, (s.strip() for s in spec.split(","))):
        matches = [i for i in IMPLS if i == name or i.startswith(name + "-")]
        if not matches:
            raise SystemExit(f"unknown impl {name!r}; choose from {', '.join(IMPLS)}")
        wanted.update(matches)
    return [i for i in IMPLS if i in wanted]


def run_grid(
    cells: dict[tuple[str, int], Cell], ns: list[int], repeats: int, tmp: Path, prm: Params
) -> None:
    """Fill ``cells``: per N, repetition-major so implementations interleave."""
    seq = 0
    for n in ns:
        for rep in range(1, repeats + 1):
            for (impl, cell_n), cell in cells.items():
                if cell_n != n or cell.skipped:
                    continue
                seq += 1
                path = tmp / f"{seq:03d}-{impl}-{n}"
                try:
                    cell.reps.append(run_impl(impl, path, n, prm))
                    msg = f"{cell.reps[-1].rate:,.0f} rec/s"
                except Skip as exc:
                    cell.skipped = msg = str(exc)
                finally:
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                print(f"  N={n} rep {rep} {impl}: {msg}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark grid and print the table (and optionally JSON)."""
    args = parse_args(argv)
    preset = FULL if args.full else QUICK
    duration = args.duration if args.duration is not None else preset["duration"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    repeats = args.repeats if args.repeats is not None else int(preset["repeats"])
    ns = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not ns or min(ns) < 1 or repeats < 1 or duration <= 0 or warmup < 0:
        raise SystemExit("need N >= 1, --repeats >= 1, --duration > 0, --warmup >= 0")
    impls = select_impls(args.impl)
    prm = Params(duration, warmup, args.append, args.segment_size)

    parent = Path(args.dir)
    created_parent = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-batching-", dir=parent))
    info = machine_info(tmp)
    cells = {(i, n): Cell(i, n) for n in ns for i in impls}
    started = time.perf_counter()
    print(
        f"# python {info['python']} ({info['implementation']}) | {info['platform']} | "
        f"cpus {info['cpu_count']} | fs {info['fs']}"
    )
    print(
        f"# {RECORD_SIZE} B records | {duration:g} s timed + {warmup:g} s warm-up | {repeats} "
        "repeats: median rate, min-max spread, median p50/p99 | baselines: "
        + ("growing file" if args.append else "preallocated file")
    )
    try:
        run_grid(cells, ns, repeats, tmp, prm)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_parent:
            try:
                parent.rmdir()
            except OSError:
                pass
    elapsed = time.perf_counter() - started

    print(render(cells, impls, ns))
    notes = [
        f"per-record runs {MAX_THREADS} threads at N={n} (capped; the lock serialises anyway)"
        for n in ns
        if n > MAX_THREADS and "per-record" in impls
    ]
    notes += [f"{c.impl} skipped: {c.skipped}" for c in cells.values() if c.skipped]
    for note in dict.fromkeys(notes):
        print(f"# note: {note}")
    print(f"# total {elapsed:.1f} s")

    if args.json:
        payload = {
            "machine": info,
            "config": {
                "record_size": RECORD_SIZE,
                "duration": duration,
                "warmup": warmup,
                "repeats": repeats,
                "concurrency": ns,
                "impls": impls,
                "max_threads": MAX_THREADS,
                "segment_size": args.segment_size,
                "baseline_file": "append" if args.append else f"preallocated {RING_SIZE} B ring",
            },
            "elapsed_s": elapsed,
            "cells": [
                {
                    "impl": c.impl,
                    "n": c.n,
                    "skipped": c.skipped,
                    "median_rate": c.rate if c.reps else None,
                    "median_p50_us": c.median_of("p50_us"),
                    "median_p99_us": c.median_of("p99_us"),
                    "reps": [asdict(r) for r in c.reps],
                }
                for c in cells.values()
            ],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
