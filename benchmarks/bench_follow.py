"""Live followers: what ``wal.read(follow=True)`` costs the writer, and how far it trails.

N appender coroutines (default 256) append 100-byte records in a loop, durably (the
default ``Durability.FSYNC``), on uvloop when it is installed; 0, 1 and 16 followers
(``async for rec in wal.read(follow=True)``) run on the same loop from the start. For each
count it reports:

* appends/s: records acknowledged per second inside the timed window (after a warm-up);
* ``r1``: one read-only follower (``walasync.open(path, readonly=True)``, in the same process
  for the clock, looking at the files every 5 ms as a reader in another process would);
* ``b16``: 16 followers taking a batch at a time (``wal.read_batches(follow=True)``), as a
  consumer that ships or copies records in bulk does: a wake-up per group commit, not an
  iteration per record;
* follower lag, p50 and p99 in ms: from the moment an ``append`` returned to the moment a
  follower yielded that record (every 16th LSN acknowledged in the window, every follower;
  a record yielded before its appender resumed counts as 0), however long after the
  window the follower gets to it.

Each repetition runs in its own process on a fresh log; repetitions of the follower counts
are interleaved; the table shows medians over the repetitions (and the range of appends/s).
Only the public API is used. Default: 3 repetitions of 3 s windows, under a minute::

    python benchmarks/bench_follow.py [--duration 3] [--reps 3] [--followers 0,1,16]
        [--appenders 256] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from typing import Any

import walasync

SAMPLE = 16  # lag is measured for LSNs that are multiples of this
RECORD = b"f" * 100
WARMUP = 0.5  # seconds before the timed window
POLL = 0.005  # read-only followers: seconds between looks at the files


def _run(main: Coroutine[Any, Any, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main), "asyncio"
    return uvloop.run(main), "uvloop"


async def repetition(
    path: str,
    appenders: int,
    followers: int,
    duration: float,
    readonly: bool = False,
    batches: bool = False,
) -> dict[str, Any]:
    """One repetition: appends/s in the window, and the followers' lag percentiles for
    the LSNs acknowledged in it."""
    acked_at: dict[int, float] = {}  # sampled LSN -> when its append returned
    lags: list[tuple[int, float]] = []  # (sampled LSN, lag) as the followers yield them
    seen = [0] * followers
    seen_so_far = [0] * followers
    ro: list[Any] = []
    lo = 1 << 64  # the first LSN acknowledged in the window (known once it starts)
    stop = False
    acked = 0
    now = time.perf_counter

    async with walasync.open(path) as wal:

        async def appender() -> None:
            nonlocal acked
            append = wal.append
            while not stop:
                lsn = await append(RECORD)
                acked += 1
                if lsn % SAMPLE == 0:
                    acked_at[lsn] = now()

        async def follower(k: int) -> None:
            count = 0
            source: Any = wal
            if readonly:  # a reader that looks at the files, as another process would
                source = await walasync.open(path, readonly=True, poll_interval=POLL)
                await source.__aenter__()
                ro.append(source)
            if batches:  # a whole group commit per step; lag of its sampled LSNs
                async for batch in wal.read_batches(follow=True):
                    first, n = batch.lsn, len(batch.records)
                    count += n
                    seen_so_far[k] = first + n - 1
                    at = now()
                    for lsn in range(max(lo, -(-first // SAMPLE) * SAMPLE), first + n, SAMPLE):
                        t = acked_at.get(lsn)
                        lags.append((lsn, 0.0 if t is None else at - t))
                seen[k] = count
                return
            async for rec in source.read(follow=True):
                count += 1
                seen_so_far[k] = rec.lsn
                if rec.lsn % SAMPLE == 0 and rec.lsn >= lo:
                    t = acked_at.get(rec.lsn)  # None: yielded before its appender resumed
                    lags.append((rec.lsn, 0.0 if t is None else now() - t))
            seen[k] = count

        tasks = [asyncio.ensure_future(follower(k)) for k in range(followers)]
        writers = [asyncio.ensure_future(appender()) for _ in range(appenders)]
        await asyncio.sleep(WARMUP)
        start, before, lo = now(), acked, wal.last_lsn + 1
        await asyncio.sleep(duration)
        elapsed, done, hi = now() - start, acked - before, wal.last_lsn
        stop = True
        await asyncio.gather(*writers)
        last = wal.last_lsn
        if readonly:  # let them catch up, then stop them
            while min(seen_so_far) < last:  # noqa: ASYNC110 - a benchmark polling its own counters
                await asyncio.sleep(POLL)
            for source in ro:
                await source.close()
    await asyncio.gather(*tasks)  # they end once the log is closed
    assert all(n == last for n in seen), (seen, last)
    window = sorted(lag for lsn, lag in lags if lsn <= hi)

    def pct(p: float) -> float | None:
        return window[min(len(window) - 1, int(p * len(window)))] * 1e3 if window else None

    return {"rate": done / elapsed, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "samples": len(window)}


def child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        kind, n = args.child[:1], int(args.child.lstrip("rb"))
        log = f"{tmp}/log"
        result, loop = _run(
            repetition(log, args.appenders, n, args.duration, kind == "r", kind == "b")
        )
    print(json.dumps({**result, "loop": loop}))


def fmt_ms(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.median(known):.2f}" if known else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per timed window")
    p.add_argument("--reps", type=int, default=3, help="repetitions (interleaved)")
    p.add_argument(
        "--followers",
        default="0,1,16,b16,r1",
        help="follower counts, comma-separated; rN: N read-only followers "
        "(open(readonly=True)); bN: N followers of whole batches (read_batches)",
    )
    p.add_argument("--appenders", type=int, default=256, help="concurrent appenders")
    p.add_argument("--dir", default=None, help="parent directory for the logs (a real disk)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args)
        return
    counts = args.followers.split(",")
    print(
        f"# walasync {walasync.__version__} | python {platform.python_version()} | "
        f"{platform.platform()} | cpus {os.cpu_count()} | {args.appenders} appenders of "
        f"{len(RECORD)} B, {args.duration:g} s windows, {args.reps} reps"
    )
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in counts}
    loop = "?"
    for _ in range(args.reps):
        for c in counts:
            cmd = [sys.executable, __file__, "--child", c, "--duration", str(args.duration)]
            cmd += ["--appenders", str(args.appenders)] + (["--dir", args.dir] if args.dir else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rep = json.loads(out.strip().splitlines()[-1])
            loop = rep["loop"]
            results[c].append(rep)
    print(f"\n| followers ({loop}) | appends/s | range | lag p50 ms | lag p99 ms |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for c in counts:
        reps = results[c]
        rates = [r["rate"] for r in reps]
        print(
            f"| {c} | {statistics.median(rates):,.0f} | {min(rates):,.0f}-{max(rates):,.0f} "
            f"| {fmt_ms([r['p50_ms'] for r in reps])} | {fmt_ms([r['p99_ms'] for r in reps])} |"
        )


if __name__ == "__main__":
    main()
