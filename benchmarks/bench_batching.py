"""Durable-append benchmark: walasync group commit vs the raw disk and other ways to persist.

Workloads (every counted record is durable, fdatasync'd or equivalent, before it counts):

* ``append``: N writers each looping on one durable record at a time (for walasync, N
  coroutines awaiting ``wal.append(record)``), for each record size.
* ``many``: 16 writers each looping on one atomic batch of 100 records
  (``wal.append_many([record] * 100)``; peers commit the 100 records in one transaction).

Implementations, all writing under the same directory (so the same file system):

* ``walasync-asyncio`` / ``walasync-uvloop``: walasync on the default loop and on uvloop.
* ``walasync-steady``: walasync (uvloop) on a log that has run for a while: retention keeps
  it at two segments, and the segments it frees are recycled, so batches land in blocks
  written before (prefilled with 4 segments before the timed window; ``--full`` only, or
  by ``--impl``).
* ``walasync-baseline``: walasync (uvloop) imported from another source tree given with
  ``--baseline DIR`` (a checkout of an earlier commit, say: ``git worktree add DIR main``),
  to measure a change side by side with what it changes; only with ``--baseline``. The
  table's ``# baseline`` lines give walasync-uvloop over walasync-baseline per group,
  as the median of the ratios of repetitions run back to back.

* ``raw``: one thread writing rounds of N ops' records as pwritev + fdatasync per batch (of at
  most 4 MiB): the disk's limit with no per-record work; latency is the round's time.
* ``per-record``: threads doing pwrite + fdatasync per op under one threading.Lock.
* ``per-record-aiofiles``: coroutines doing, under one asyncio.Lock, aiofiles write + flush
  and fdatasync in a thread per op.
* ``sqlite3`` (WAL, synchronous=FULL, commit per op), ``rocksdb`` (synced puts; rocksdict,
  or aimrocks where rocksdict holds the GIL), ``lmdb`` (sync=True, txn per op): threads.

Thread-based implementations run min(N, 256) threads. The baselines overwrite a
preallocated, synced 16 MiB ring, as walasync writes into zero-filled segments (``--append``:
a growing file instead). Optional packages are imported lazily; a missing one gives a
"skipped: X not installed" row.

Each repetition runs in its own process (so CPU time and peak RSS are its own), after a
warm-up, on a fresh log; repetitions of the implementations in a cell are interleaved; the
table shows medians and the spread. ``--quick`` (default) keeps within a minute, ``--full``
within ten minutes on 2 cores; a time budget skips what is left if the machine is slow.

Usage::

    python benchmarks/bench_batching.py                    # quick: 100 B, N up to 1024
    python benchmarks/bench_batching.py --full --json bench-results/full.json \\
        --plot bench-results/full.png
    python benchmarks/bench_batching.py --impl walasync,raw --sizes 100,4096 --concurrency 1,256
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from _common import Rep, Skip, Spec, maxrss_mib
from _report import Cell, Cells, Group, render, size_label, target_lines

IMPLS = (
    "walasync-asyncio",
    "walasync-uvloop",
    "walasync-steady",
    "walasync-baseline",
    "raw",
    "per-record",
    "per-record-aiofiles",
    "sqlite3",
    "rocksdb",
    "lmdb",
)
THREADED = ("per-record", "sqlite3", "rocksdb", "lmdb")
SLOW = ("per-record", "per-record-aiofiles", "sqlite3", "lmdb")  # one writer at a time
PEERS = ("per-record-aiofiles", "sqlite3", "rocksdb", "lmdb")  # --quick: at one N only
FULL_ONLY = ("walasync-steady",)  # --quick: only when asked for by --impl
REQUIRES = {
    "walasync-uvloop": "uvloop",
    "walasync-steady": "uvloop",
    "walasync-baseline": "uvloop",
    "per-record-aiofiles": "aiofiles",
    "lmdb": "lmdb",
}
MANY_N, MANY_BATCH = 16, 100
MAX_THREADS = 256
REP_OVERHEAD = 0.35  # seconds per repetition beyond warm-up + timed: process, open, close


@dataclass(frozen=True)
class Preset:
    duration: float
    warmup: float
    repeats: int
    sizes: tuple[int, ...]
    concurrency: tuple[int, ...]
    many_sizes: tuple[int, ...]
    many_impls: tuple[str, ...]  # implementations in the "many" workload
    budget: float  # seconds: the remaining repetitions are skipped past this


QUICK = Preset(
    duration=0.4,
    warmup=0.1,
    repeats=3,
    sizes=(100,),
    concurrency=(1, 16, 256, 1024),
    many_sizes=(100,),
    many_impls=("walasync-uvloop", "raw", "rocksdb"),
    budget=52.0,
)
FULL = Preset(
    duration=0.6,
    warmup=0.15,
    repeats=3,
    sizes=(100, 1024, 4096, 65536),
    concurrency=(1, 16, 256, 1024, 4096),
    many_sizes=(100, 4096),
    many_impls=IMPLS,
    budget=560.0,
)


# --------------------------------------------------------------------------- child side


def run_impl(spec: Spec) -> Rep:
    """Run one repetition of ``spec`` in this process."""
    import _impls
    import _peers

    impl = spec.impl
    if impl.startswith("walasync-"):
        return _impls.run_walasync(spec, uvloop=impl != "walasync-asyncio")
    runners = {
        "raw": _impls.run_raw,
        "per-record": _impls.run_per_record,
        "per-record-aiofiles": _impls.run_aiofiles,
        "sqlite3": _peers.run_sqlite,
        "rocksdb": _peers.run_rocksdb,
        "lmdb": _peers.run_lmdb,
    }
    return runners[impl](spec)


def _preimport(spec: Spec) -> None:
    """Import what the implementation needs, so the RSS delta is the run's, not the imports'."""
    names = {
        "walasync-asyncio": ["walasync"],
        "walasync-uvloop": ["walasync", "uvloop"],
        "walasync-steady": ["walasync", "uvloop"],
        "walasync-baseline": ["walasync", "uvloop"],
        "rocksdb": [spec.rocksdb_binding or ""],
    }.get(spec.impl, [REQUIRES.get(spec.impl, "")])
    import _impls
    import _peers  # noqa: F401

    _impls._ensure_walasync_importable()
    for name in filter(None, names):
        if importlib.util.find_spec(name) is not None:  # if missing, the run raises Skip
            importlib.import_module(name)


def child_main(arg: str) -> None:
    """Run the repetition described by JSON ``arg``; print its result as one JSON line."""
    spec = Spec(**json.loads(arg))
    if spec.baseline is not None:  # walasync-baseline: the other tree's walasync, first
        sys.path.insert(0, spec.baseline)
    _preimport(spec)
    if spec.baseline is not None:
        import walasync

        where = Path(walasync.__file__).resolve()
        if not where.is_relative_to(Path(spec.baseline).resolve()):
            raise SystemExit(f"walasync-baseline imported {where}, not from {spec.baseline}")
    base = maxrss_mib()
    try:
        rep = run_impl(spec)
    except Skip as exc:
        print(json.dumps({"skip": str(exc)}))
        return
    rep.peak_rss_mib = maxrss_mib()
    rep.rss_delta_mib = rep.peak_rss_mib - base
    print(json.dumps({"rep": asdict(rep)}), flush=True)
    os._exit(0)  # don't wait for threads left behind (see _common.run_threads)


# --------------------------------------------------------------------------- parent side


def run_child(spec: Spec) -> Rep | str:
    """Run one repetition in a child process: its Rep, or why it was skipped or failed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(spec))]
    timeout = spec.warmup + spec.duration + 120
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"failed: timed out after {timeout:.0f} s"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return f"failed: {err}"
    out = json.loads(lines[-1])
    if "skip" in out:
        return str(out["skip"])
    return Rep(**out["rep"])


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


def _ints(spec: str | None, default: Sequence[int]) -> tuple[int, ...]:
    if spec is None:
        return tuple(default)
    return tuple(int(x) for x in spec.split(",") if x.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="full", action="store_false", help="quick run (default)")
    mode.add_argument("--full", dest="full", action="store_true", help="the whole matrix")
    p.set_defaults(full=False)
    p.add_argument("--concurrency", help="comma-separated N values for the append workload")
    p.add_argument("--sizes", help="comma-separated record sizes in bytes (append workload)")
    p.add_argument("--many-sizes", help="record sizes for the append_many workload ('' = none)")
    p.add_argument("--duration", type=float, help="timed seconds per repetition")
    p.add_argument("--warmup", type=float, help="untimed warm-up seconds per repetition")
    p.add_argument("--repeats", type=int, help="repetitions per cell")
    p.add_argument("--budget", type=float, help="skip repetitions past this many seconds")
    p.add_argument(
        "--impl",
        default=",".join(IMPLS),
        help=f"comma-separated subset of {', '.join(IMPLS)} ('walasync' = both loops)",
    )
    p.add_argument(
        "--slow-max-n",
        type=int,
        default=256,
        help=f"largest N for {', '.join(SLOW)}, which serialise anyway (default 256)",
    )
    p.add_argument("--max-threads", type=int, default=MAX_THREADS, help="cap on threads")
    p.add_argument("--dir", default=".bench-tmp", help="parent dir for temp files (real disk)")
    p.add_argument(
        "--append",
        action="store_true",
        help="baselines append to a growing file instead of overwriting a preallocated one",
    )
    p.add_argument("--segment-size", type=int, help="walasync segment_size in bytes")
    p.add_argument(
        "--baseline",
        metavar="DIR",
        help="a walasync source tree to run as walasync-baseline, beside walasync-uvloop",
    )
    p.add_argument("--json", metavar="PATH", help="write all numbers to PATH")
    p.add_argument("--plot", metavar="PATH.png", help="plot 100 B appends against N to PATH")
    p.add_argument("--child", help=argparse.SUPPRESS)
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


@dataclass
class Plan:
    groups: list[Group]
    cells: Cells
    notes: list[str]


def make_plan(args: argparse.Namespace, preset: Preset, impls: list[str]) -> Plan:
    """The groups and cells to run, and notes on what was left out and why."""
    sizes = _ints(args.sizes, preset.sizes)
    ns = _ints(args.concurrency, preset.concurrency)
    many_sizes = _ints(args.many_sizes, preset.many_sizes)
    if not ns or min(ns) < 1 or (sizes and min(sizes) < 1) or (many_sizes and min(many_sizes) < 1):
        raise SystemExit("need N >= 1 and record sizes >= 1")
    quick_peer_n = min(ns, key=lambda n: abs(n - 256))
    groups = [Group("append", s, n) for s in sizes for n in ns]
    groups += [Group("many", s, MANY_N) for s in many_sizes]
    cells: Cells = {}
    notes: list[str] = []
    if "walasync-baseline" in impls and args.baseline is None:
        if args.impl != ",".join(IMPLS):  # asked for by name, not in the default list
            raise SystemExit("walasync-baseline needs --baseline DIR")
        impls = [i for i in impls if i != "walasync-baseline"]
    for g in groups:
        for impl in impls:
            if g.workload == "many" and impl not in preset.many_impls:
                continue
            if g.workload == "append" and impl in SLOW and g.n > args.slow_max_n:
                continue  # noted below
            if not args.full and impl in PEERS and g.workload == "append" and g.n != quick_peer_n:
                continue
            if not args.full and impl in FULL_ONLY and args.impl == ",".join(IMPLS):
                continue
            cell = cells[(g, impl)] = Cell(impl, g)
            module = REQUIRES.get(impl)
            if module and importlib.util.find_spec(module) is None:
                cell.skipped = f"{module} not installed"
    slow = [i for i in impls if i in SLOW]
    if slow and max(ns) > args.slow_max_n:
        notes.append(
            f"{', '.join(slow)} run at N <= {args.slow_max_n} only: they commit one op at a "
            "time, so their rate is flat in N (--slow-max-n)"
        )
    if not args.full:
        left: list[str] = []
        if peers := [i for i in impls if i in PEERS]:
            left.append(f"{', '.join(peers)} at N={quick_peer_n} only")
        others = [i for i in impls if i not in preset.many_impls]
        if others and many_sizes:
            left.append(f"append_many without {', '.join(others)}")
        if omitted := [size_label(x) for x in FULL.sizes if x not in sizes]:
            left.append(f"no {', '.join(omitted)} records")
        if omitted := [str(n) for n in FULL.concurrency if n not in ns]:
            left.append(f"no N={', '.join(omitted)}")
        if left:
            notes.append("--quick, for time (--full runs the whole matrix): " + "; ".join(left))
    over = [i for i in THREADED if any(g.n > args.max_threads for (g, j) in cells if j == i)]
    if over:
        notes.append(f"{', '.join(over)} run min(N, {args.max_threads}) threads (--max-threads)")
    used = [g for g in groups if any(k[0] == g for k in cells)]
    return Plan(groups=used, cells=cells, notes=notes)


def run_grid(plan: Plan, base: Spec, repeats: int, budget: float, tmp: Path, t0: float) -> bool:
    """Fill the cells; per group, repetition-major so implementations interleave.

    Returns False if the time budget ran out (the remaining repetitions are skipped).
    """
    est = base.warmup + base.duration + REP_OVERHEAD
    seq = 0
    for gi, g in enumerate(plan.groups, 1):
        todo = [c for (cg, _), c in plan.cells.items() if cg == g and not c.skipped]
        for _rep in range(repeats):
            for cell in todo:
                if cell.skipped:
                    continue
                if time.perf_counter() - t0 + est > budget:
                    for c in plan.cells.values():
                        if not c.skipped and not c.reps:
                            c.skipped = "out of time budget (--budget)"
                    return False
                seq += 1
                path = tmp / f"{seq:04d}-{cell.impl}"
                batch = 1 if g.workload == "append" else MANY_BATCH
                spec = replace(
                    base, impl=cell.impl, workload=g.workload, n=g.n, size=g.size, batch=batch,
                    path=str(path),
                    baseline=base.baseline if cell.impl == "walasync-baseline" else None,
                )  # fmt: skip
                try:
                    out = run_child(spec)
                finally:
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                if isinstance(out, str):
                    cell.skipped = out
                else:
                    cell.reps.append(out)
        rates = ", ".join(
            f"{c.impl} {c.rate:,.0f}" if c.reps else f"{c.impl} skipped" for c in todo
        )
        print(
            f"  [{gi}/{len(plan.groups)} {time.perf_counter() - t0:.0f}s] {g.workload} "
            f"{size_label(g.size)} N={g.n}: {rates}",
            file=sys.stderr,
            flush=True,
        )
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark grid and print the tables (and optionally JSON and a plot)."""
    args = parse_args(argv)
    if args.child is not None:
        child_main(args.child)
        return
    started = time.perf_counter()
    preset = FULL if args.full else QUICK
    duration = args.duration if args.duration is not None else preset.duration
    warmup = args.warmup if args.warmup is not None else preset.warmup
    repeats = args.repeats if args.repeats is not None else preset.repeats
    budget = args.budget if args.budget is not None else preset.budget
    if repeats < 1 or duration <= 0 or warmup < 0:
        raise SystemExit("need --repeats >= 1, --duration > 0, --warmup >= 0")
    impls = select_impls(args.impl)
    plan = make_plan(args, preset, impls)

    parent = Path(args.dir)
    created_parent = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-batching-", dir=parent))
    info = machine_info(tmp)
    base = Spec(
        impl="", workload="", n=0, size=0, batch=1, duration=duration, warmup=warmup, path="",
        max_threads=args.max_threads, append_file=args.append, segment_size=args.segment_size,
        baseline=None if args.baseline is None else str(Path(args.baseline).resolve()),
    )  # fmt: skip
    print(
        f"# python {info['python']} ({info['implementation']}) | {info['platform']} | "
        f"cpus {info['cpu_count']} | fs {info['fs']}"
    )
    print(
        f"# {'full' if args.full else 'quick'}: {duration:g} s timed + {warmup:g} s warm-up per "
        f"repetition, {repeats} interleaved repetitions, each in its own process | baselines: "
        + ("growing file" if args.append else "preallocated file"),
        flush=True,
    )
    finished = True
    try:
        rocks = [c for (_, i), c in plan.cells.items() if i == "rocksdb" and not c.skipped]
        if rocks:
            from _peers import choose_rocksdb

            binding, why = choose_rocksdb(str(tmp))
            plan.notes += why
            base = replace(base, rocksdb_binding=binding)
            if binding is None:
                for c in rocks:
                    c.skipped = "no usable RocksDB binding: " + "; ".join(why)
        finished = run_grid(plan, base, repeats, budget, tmp, started)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_parent:
            try:
                parent.rmdir()
            except OSError:
                pass
    elapsed = time.perf_counter() - started
    if not finished:
        plan.notes.append(f"the {budget:g} s time budget ran out: later repetitions skipped")
    short = sorted({c.impl for c in plan.cells.values() if c.reps and len(c.reps) < repeats})
    if short:
        plan.notes.append(f"fewer than {repeats} repetitions for some cells of {', '.join(short)}")

    from _report import LEGEND, baseline_lines, payload, plot, write_json

    print(render(plan.cells, plan.groups, impls, MANY_BATCH))
    print(target_lines(plan.cells, plan.groups))
    if args.baseline is not None:
        print(baseline_lines(plan.cells, plan.groups))
    for note in dict.fromkeys(plan.notes):
        print(f"# note: {note}")
    print(textwrap.fill(LEGEND, 100, subsequent_indent="#   "))
    if args.plot:
        fs = info["fs"].split(" ")[0]
        title = f"durable 100 B appends | {fs}, {info['cpu_count']} cpus, python {info['python']}"
        why_not = plot(plan.cells, impls, args.plot, title)
        print(f"# plot: {why_not or args.plot}")
    print(f"# total {elapsed:.1f} s")
    if args.json:
        config = {
            "mode": "full" if args.full else "quick",
            "preset": asdict(preset),
            "duration": duration,
            "warmup": warmup,
            "repeats": repeats,
            "budget": budget,
            "impls": impls,
            "groups": [asdict(g) for g in plan.groups],
            "many_writers": MANY_N,
            "many_batch": MANY_BATCH,
            "max_threads": args.max_threads,
            "slow_max_n": args.slow_max_n,
            "segment_size": args.segment_size,
            "rocksdb_binding": base.rocksdb_binding,
            "baseline": base.baseline,
            "baseline_file": "append" if args.append else "preallocated 16 MiB ring",
        }
        write_json(args.json, payload(info, config, plan.cells, plan.notes, elapsed))


if __name__ == "__main__":
    main()
