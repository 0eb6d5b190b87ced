"""The issue's other targets: read throughput, open time, memory under 100,000 appenders.

Each measurement runs in its own process (peak RSS is per process), on uvloop when it is
installed::

    python benchmarks/bench_extras.py [--records 1000000] [--appenders 100000] [--dir DIR]

* ``read``: records/s of ``async for rec in wal.read()`` over a reopened log of 100-byte
  records (median of 3 passes);
* ``open``: seconds to open a log with 1,000 sealed segments and a full 64 MiB active
  segment (median of 5 opens);
* ``memory``: peak RSS of a process in which that many coroutines append 1 KiB records at
  once, each twice (default backpressure limits).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from typing import Any

import walasync


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def read_rate(path: str, records: int) -> None:
    unit = [b"r" * 100] * 1000
    async with walasync.open(path) as wal:
        for _ in range(records // len(unit)):
            await wal.append_many(unit)
    rates = []
    async with walasync.open(path) as wal:
        for _ in range(3):
            start = time.perf_counter()
            count = 0
            async for _rec in wal.read():
                count += 1
            rates.append(count / (time.perf_counter() - start))
    print(f"read: {statistics.median(rates):,.0f} records/s ({count:,} records of 100 B)")


def segment_count(path: str) -> int:
    return sum(name.endswith(".wal") for name in os.listdir(path))


async def open_time(path: str) -> None:
    async with walasync.open(path, segment_size=16 << 10) as wal:
        unit = [b"s" * 1000] * 10
        while segment_count(path) <= 1000:
            for _ in range(50):
                await wal.append_many(unit)
    big = [b"a" * 4000] * 250  # about 1 MiB per call
    frame = 24 + 4 * len(big) + sum(map(len, big))  # README, "On-disk format" (8-aligned)
    segment = 64 << 20
    fits = (segment - 32) // frame
    async with walasync.open(path) as wal:  # default 64 MiB segments from here on
        for _ in range(fits):  # the first one starts a 64 MiB segment
            await wal.append_many(big)
    sealed = segment_count(path) - 1
    fill = (32 + fits * frame) / segment
    times = []
    for _ in range(5):
        start = time.perf_counter()
        wal = await walasync.open(path)
        times.append(time.perf_counter() - start)
        await wal.close()
    print(
        f"open: {statistics.median(times) * 1e3:.1f} ms median of 5 "
        f"({sealed:,} sealed segments, active segment {fill:.0%} full)"
    )


async def memory(path: str, appenders: int) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with walasync.open(path) as wal:
        record = b"m" * 1024

        async def appender() -> None:
            await wal.append(record)
            await wal.append(record)

        await asyncio.gather(*(appender() for _ in range(appenders)))
        assert wal.last_lsn == 2 * appenders
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"memory: {appenders:,} appenders of 1 KiB: peak RSS {peak / 1024:.0f} MiB "
        f"({before / 1024:.0f} MiB before opening the log)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--records", type=int, default=1_000_000, help="records to read back")
    p.add_argument("--appenders", type=int, default=100_000, help="concurrent appenders")
    p.add_argument("--dir", default=None, help="parent directory for the logs (a real disk)")
    p.add_argument("--only", choices=("read", "open", "memory"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only is None:  # each measurement in a fresh process
        for what in ("read", "open", "memory"):
            cmd = [sys.executable, __file__, "--only", what, "--records", str(args.records)]
            cmd += ["--appenders", str(args.appenders)] + (["--dir", args.dir] if args.dir else [])
            subprocess.run(cmd, check=True)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = f"{tmp}/log"
        if args.only == "read":
            _run(read_rate(path, args.records))
        elif args.only == "open":
            _run(open_time(path))
        else:
            _run(memory(path, args.appenders))


if __name__ == "__main__":
    main()
