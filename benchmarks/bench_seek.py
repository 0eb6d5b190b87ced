"""Seek latency against log size: reading from an LSN in the middle of a large log costs
about what reading from the start of its last segment does.

One log grows through the sizes asked for (1 KiB records, appended as 1 MiB units); at
each size the log is reopened and, for LSNs drawn at random over the whole log, the time
from ``wal.read(start=lsn)`` to its first record is measured, against the same for the
first LSN of the last segment. "cold" is a segment's first read since open (its seal, the
index, is read then); "warm" a later one. Medians and p99 over the draws, in microseconds.

With ``--drop-caches`` (Linux, as root) two more columns compare like with like on the
disk: before each seek the kernel's page cache is dropped (``/proc/sys/vm/drop_caches``),
so a seek into the middle of the log and one to the last segment's first LSN both read
their bytes from the disk (without it the last segment, just written, is in the page
cache and the middle of a large log is not).

Usage::

    python benchmarks/bench_seek.py                  # 100 MB and 1 GB
    python benchmarks/bench_seek.py --sizes 100M,1G,10G --dir /path/on/the/disk
    python benchmarks/bench_seek.py --sizes 100M,1G,10G --drop-caches
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import walasync

RECORD = 1024
UNIT = [b"r" * RECORD] * 1024  # 1 MiB per append_many


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].isalpha() else int(text)


async def first_record_us(wal: walasync.Wal, lsn: int) -> float:
    start = time.perf_counter()
    async for rec in wal.read(start=lsn):
        assert rec.lsn == lsn
        break
    return (time.perf_counter() - start) * 1e6


def drop_caches() -> None:
    """Empty the kernel's page cache (clean pages only: sync first)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")


async def disk_us(wal: walasync.Wal, lsn: int) -> float:
    """`first_record_us` with the page cache dropped first: the bytes come from the disk."""
    await asyncio.to_thread(drop_caches)
    return await first_record_us(wal, lsn)


def summary(samples: list[float]) -> str:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"{statistics.median(samples):>9,.0f} {p99:>9,.0f}"


async def measure(path: str, draws: int, rng: random.Random, disk: bool) -> tuple[str, ...]:
    start = time.perf_counter()
    wal = await walasync.open(path)
    opened = (time.perf_counter() - start) * 1e3
    try:
        last = wal.last_lsn
        last_segment = max(int(n[:20]) for n in os.listdir(path) if n.endswith(".wal"))
        lsns = [rng.randint(1, last) for _ in range(draws)]
        cold = [await first_record_us(wal, lsn) for lsn in lsns]
        warm = [await first_record_us(wal, lsn) for lsn in lsns]
        tail = [await first_record_us(wal, last_segment) for _ in range(draws)]
        disk_rows: tuple[str, ...] = ()
        if disk:  # both from the disk, interleaved
            mid: list[float] = []
            end: list[float] = []
            for lsn in lsns:
                mid.append(await disk_us(wal, lsn))
                end.append(await disk_us(wal, last_segment))
            disk_rows = (summary(mid), summary(end))
        segments = sum(n.endswith(".wal") for n in os.listdir(path))
    finally:
        await wal.close()
    rows = (f"{segments:>8}", f"{opened:>8.1f}", summary(cold), summary(warm), summary(tail))
    return rows + disk_rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100M,1G", help="log sizes, e.g. 100M,1G,10G")
    parser.add_argument("--draws", type=int, default=200, help="seeks per size")
    parser.add_argument("--dir", default=".bench-tmp", help="where the log goes (a real disk)")
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="also time seeks with the page cache dropped before each (Linux, root)",
    )
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=args.dir)
    path = os.path.join(tmp, "log")
    rng = random.Random(1)
    print("one log grown through each size; time to the first record of read(start), us")
    print(
        f"{'size':>6} {'segments':>8} {'open ms':>8} {'cold p50':>9} {'cold p99':>9} "
        f"{'warm p50':>9} {'warm p99':>9} {'last p50':>9} {'last p99':>9}"
        + (
            f" {'disk p50':>9} {'disk p99':>9} {'dlast p50':>9} {'dlast p99':>9}"
            if args.drop_caches
            else ""
        )
    )
    written = 0
    try:
        for label in args.sizes.split(","):
            target = parse_size(label)
            async with walasync.open(path) as wal:
                while written < target:
                    await wal.append_many(UNIT)
                    written += RECORD * len(UNIT)
            rows = await measure(path, args.draws, rng, args.drop_caches)
            print(f"{label:>6}", *rows, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
