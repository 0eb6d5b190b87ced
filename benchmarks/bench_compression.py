"""Compression: what ``compression="zstd"`` costs and saves, side by side with it off.

N appender coroutines (default 256) append records from a pool in a loop, durably (the
default ``Durability.FSYNC``), on uvloop when it is installed. Two kinds of records of the
same sizes: JSON events (about 190 B, compressible as events are) and random bytes
(incompressible: compression must then cost little and store them plain). For each kind,
compression off, and zstd at the levels asked for (default 1 and 3). For each it reports:

* appends/s: records acknowledged per second inside the timed window (after a warm-up);
* B/record: bytes of segment files per record, over the sealed segments (a sealed
  segment's file ends at its seal: batch headers, padding and the seal's index included);
* CPU µs/record: the process's CPU time (every thread: the loop, the I/O thread that
  compresses) in the window, per record appended in it;
* reads/s and read CPU µs/record: ``wal.read()`` of the whole log afterwards (the
  decompression's cost).

Each repetition runs in its own process on a fresh log; repetitions are interleaved; the
table shows medians over the repetitions. Only the public API is used. Then, without the
log, a look at what a shared zstd dictionary would add, batch by batch, at the batch sizes
that 1, 16 and 256 appenders make (``--no-dictionary`` skips it). Default: 3 repetitions of
3 s windows, about two minutes::

    python benchmarks/bench_compression.py [--duration 3] [--reps 3] [--levels 1,3]
        [--appenders 256] [--segment-size 2097152] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from typing import Any

import walasync

WARMUP = 0.5  # seconds before the timed window
POOL = 4096  # distinct records of each kind
TYPES = ("order_created", "order_filled", "order_cancelled", "payment_captured", "user_login")
SYMBOLS = ("AAPL", "MSFT", "GOOG", "AMZN", "TSLA", "NVDA", "META")


def events(n: int, seed: int = 1) -> list[bytes]:
    """JSON events of about 190 bytes: shared keys and vocabularies, varying numbers and ids
    (a random order id and session id each, which do not compress)."""
    rng = random.Random(seed)
    return [
        json.dumps(
            {
                "id": i,
                "ts": round(1767225600 + i * 0.0013 + rng.random() / 1000, 6),
                "type": rng.choice(TYPES),
                "user": f"u{rng.randrange(100000):06d}",
                "order": f"o-{rng.getrandbits(48):012x}",
                "symbol": rng.choice(SYMBOLS),
                "price": round(rng.uniform(10, 900), 2),
                "qty": rng.randrange(1, 500),
                "source": rng.choice(("web", "ios", "android", "api")),
                "session": rng.randbytes(8).hex(),
            },
            separators=(",", ":"),
        ).encode()
        for i in range(n)
    ]


def pool(kind: str) -> list[bytes]:
    json_events = events(POOL)
    if kind == "json":
        return json_events
    rng = random.Random(2)
    return [rng.randbytes(len(e)) for e in json_events]  # the same sizes


def _run(main: Coroutine[Any, Any, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main), "asyncio"
    return uvloop.run(main), "uvloop"


def sealed_bytes(path: str) -> tuple[int, int]:
    """(bytes, records) of the sealed segments: every segment file but the last, whose
    names are their first LSNs."""
    names = sorted(n for n in os.listdir(path) if n.endswith(".wal"))
    if len(names) < 2:
        return 0, 0
    size = sum(os.path.getsize(os.path.join(path, n)) for n in names[:-1])
    return size, int(names[-1].removesuffix(".wal")) - int(names[0].removesuffix(".wal"))


async def repetition(
    path: str, kind: str, level: int | None, appenders: int, duration: float, segment: int
) -> dict[str, Any]:
    records = pool(kind)
    options: dict[str, Any] = {"segment_size": segment}
    if level is not None:
        options.update(compression="zstd", compression_level=level)
    stop = False
    acked = 0
    now, cpu = time.perf_counter, time.process_time
    async with walasync.open(path, **options) as wal:

        async def appender(k: int) -> None:
            nonlocal acked
            append = wal.append
            i = k * 17
            while not stop:
                await append(records[i % POOL])
                i += 1
                acked += 1

        writers = [asyncio.ensure_future(appender(k)) for k in range(appenders)]
        await asyncio.sleep(WARMUP)
        start, cpu0, before = now(), cpu(), acked
        await asyncio.sleep(duration)
        elapsed, cpu_used, done = now() - start, cpu() - cpu0, acked - before
        stop = True
        await asyncio.gather(*writers)
        start, cpu0 = now(), cpu()
        count = 0
        async for _ in wal.read():
            count += 1
        read_elapsed, read_cpu = now() - start, cpu() - cpu0
        assert count == wal.last_lsn
    size, sealed = sealed_bytes(path)
    return {
        "rate": done / elapsed,
        "cpu_us": cpu_used / done * 1e6,
        "bytes": size / sealed if sealed else None,
        "plain_bytes": sum(map(len, records)) / POOL,
        "read_rate": count / read_elapsed,
        "read_cpu_us": read_cpu / count * 1e6,
    }


def child(args: argparse.Namespace) -> None:
    kind, setting = args.child.split(":")
    level = None if setting == "off" else int(setting)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result, loop = _run(
            repetition(f"{tmp}/log", kind, level, args.appenders, args.duration, args.segment_size)
        )
    print(json.dumps({**result, "loop": loop}))


def med(values: list[Any], spec: str) -> str:
    known = [v for v in values if v is not None]
    return format(statistics.median(known), spec) if known else "-"


def dictionary_table(levels: list[int]) -> None:
    """Batch-by-batch ratios and CPU with and without a dictionary trained on earlier
    events, at the batch sizes 1, 16 and 256 appenders make (records per batch)."""
    import zstandard

    sample = events(20000, seed=3)
    test = events(25600, seed=4)
    trained = zstandard.train_dictionary(16 << 10, sample)
    print("\n| level | records per batch | ratio | ratio with a 16 KiB dictionary |", end="")
    print(" µs/record | µs/record with it |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for level in levels:
        plain_c = zstandard.ZstdCompressor(level=level)
        dict_c = zstandard.ZstdCompressor(level=level, dict_data=trained)
        for n in (1, 16, 128, 256):
            batches = [b"".join(test[i : i + n]) for i in range(0, min(len(test), n * 100), n)]
            raw = sum(map(len, batches)) + 4 * n * len(batches)  # + the length tables
            cells = []
            for c in (plain_c, dict_c):
                t = time.process_time()
                out = sum(len(c.compress(b)) for b in batches)
                cells.append((raw / out, (time.process_time() - t) / (n * len(batches)) * 1e6))
            print(
                f"| {level} | {n} | {cells[0][0]:.2f} | {cells[1][0]:.2f} | "
                f"{cells[0][1]:.2f} | {cells[1][1]:.2f} |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per timed window")
    p.add_argument("--reps", type=int, default=3, help="repetitions (interleaved)")
    p.add_argument("--levels", default="1,3", help="zstd levels, comma-separated")
    p.add_argument("--kinds", default="json,random", help="record kinds: json, random")
    p.add_argument("--appenders", type=int, default=256, help="concurrent appenders")
    p.add_argument("--segment-size", type=int, default=2 << 20, help="segment_size")
    p.add_argument("--dir", default=None, help="parent directory for the logs (a real disk)")
    p.add_argument("--no-dictionary", action="store_true", help="skip the dictionary table")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args)
        return
    levels = [int(x) for x in args.levels.split(",") if x]
    settings = ["off", *map(str, levels)]
    rows = [f"{kind}:{s}" for kind in args.kinds.split(",") for s in settings]
    print(
        f"# walasync {walasync.__version__} | python {platform.python_version()} | "
        f"{platform.platform()} | cpus {os.cpu_count()} | {args.appenders} appenders, "
        f"{args.duration:g} s windows, {args.reps} reps, segments of {args.segment_size} B"
    )
    results: dict[str, list[dict[str, Any]]] = {r: [] for r in rows}
    loop = "?"
    for _ in range(args.reps):
        for row in rows:
            cmd = [sys.executable, __file__, "--child", row, "--duration", str(args.duration)]
            cmd += ["--appenders", str(args.appenders), "--segment-size", str(args.segment_size)]
            cmd += ["--dir", args.dir] if args.dir else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rep = json.loads(out.strip().splitlines()[-1])
            loop = rep["loop"]
            results[row].append(rep)
    print(f"\n| records ({loop}) | compression | appends/s | range | B/record (record) |", end="")
    print(" CPU µs/record | reads/s | read CPU µs/record |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        kind, setting = row.split(":")
        reps = results[row]
        rates = [r["rate"] for r in reps]
        print(
            f"| {kind} | {'off' if setting == 'off' else f'zstd {setting}'} "
            f"| {statistics.median(rates):,.0f} | {min(rates):,.0f}-{max(rates):,.0f} "
            f"| {med([r['bytes'] for r in reps], '.1f')} ({reps[0]['plain_bytes']:.0f}) "
            f"| {med([r['cpu_us'] for r in reps], '.2f')} "
            f"| {med([r['read_rate'] for r in reps], ',.0f')} "
            f"| {med([r['read_cpu_us'] for r in reps], '.2f')} |"
        )
    if not args.no_dictionary:
        dictionary_table(levels)


if __name__ == "__main__":
    main()
