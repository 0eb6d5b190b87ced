"""The keyed view (`walasync.open_keyed`): what its index costs appends, open and memory.

* append: N appenders (default 256) append 100-byte values under 16-byte keys through
  `KeyedLog.append`, against `Wal.append` of the very same encoded records (so both write
  the same bytes), side by side, repetitions interleaved, each in its own process on a
  fresh log, on uvloop when installed; records/s in a timed window after a warm-up.
* open: a log of R keyed records over K keys (default 1M records: 1M keys once each, and
  100k keys ten times each) is opened with its index snapshot (`KEYINDEX`, written at
  close) and without (`snapshot_every=None` on a copy without it: the whole log replayed);
  ms to open, median of the repetitions, with the index's memory per key (tracemalloc, in
  a separate run) and the size of the snapshot file. Then `latest(key)` for 1,000 random
  keys (µs, p50 and p99) and `records_for` of a ten-record key.

    python benchmarks/bench_keyed.py [--duration 3] [--reps 3] [--appenders 256]
        [--records 1000000] [--only append|open] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Coroutine
from typing import Any

import walasync

VALUE = b"v" * 100
WARMUP = 0.5
UNIT = 1000  # records per append_many while building a log


def _run(main: Coroutine[Any, Any, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main), "asyncio"
    return uvloop.run(main), "uvloop"


def key(i: int) -> str:
    return f"user:{i:011d}"  # 16 bytes


# -- append throughput -----------------------------------------------------------------------


async def appends(path: str, impl: str, appenders: int, duration: float) -> dict[str, Any]:
    acked = 0
    stop = False
    keys = [key(i) for i in range(100_000)]

    if impl == "keyed":
        kv = await walasync.open_keyed(path)

        async def appender(k: int) -> None:
            nonlocal acked
            append = kv.append
            i = k
            while not stop:
                await append(keys[i % len(keys)], VALUE)
                acked += 1
                i += appenders

        closer = kv.close
    else:
        async with walasync.open_keyed(path) as kv:  # the encoded records, through the API
            first = await kv.append_many([(k, VALUE) for k in keys])
            datas = [r.data async for r in kv.wal.read(first.start)]
        wal = await walasync.open(path)

        async def appender(k: int) -> None:
            nonlocal acked
            append = wal.append
            i = k
            while not stop:
                await append(datas[i % len(datas)])
                acked += 1
                i += appenders

        closer = wal.close

    tasks = [asyncio.ensure_future(appender(k)) for k in range(appenders)]
    await asyncio.sleep(WARMUP)
    start, before, cpu = time.perf_counter(), acked, time.process_time()
    await asyncio.sleep(duration)
    elapsed, done, cpu = time.perf_counter() - start, acked - before, time.process_time() - cpu
    stop = True
    await asyncio.gather(*tasks)
    await closer()
    return {"rate": done / elapsed, "cpu_us": cpu / done * 1e6}


# -- open time -------------------------------------------------------------------------------


async def build(path: str, records: int, keys: int) -> dict[str, Any]:
    async with walasync.open_keyed(path) as kv:
        for base in range(0, records, UNIT):
            await kv.append_many([(key(i % keys), VALUE) for i in range(base, base + UNIT)])
    return {}


async def opening(path: str, snapshot: bool, keys: int, measure_memory: bool) -> dict[str, Any]:
    every = 100_000 if snapshot else None
    if measure_memory:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    kv = await walasync.open_keyed(path, snapshot_every=every)
    ms = (time.perf_counter() - start) * 1e3
    out: dict[str, Any] = {"open_ms": ms, "replayed": kv.replayed, "keys": len(kv)}
    if measure_memory:
        out["bytes_per_key"] = (tracemalloc.get_traced_memory()[0] - before) / len(kv)
        tracemalloc.stop()
    else:
        rng = random.Random(1)
        times = []
        for _ in range(1000):
            k = key(rng.randrange(keys))
            t = time.perf_counter()
            assert await kv.latest(k) is not None
            times.append(time.perf_counter() - t)
        times.sort()
        out["latest_p50_us"] = times[len(times) // 2] * 1e6
        out["latest_p99_us"] = times[int(len(times) * 0.99)] * 1e6
        t = time.perf_counter()
        n = len([r async for r in kv.records_for(key(7))])
        out["records_for_ms"] = (time.perf_counter() - t) * 1e3
        out["records_for_n"] = n
    await kv.close()
    return out


def child(args: argparse.Namespace) -> None:
    kind, *rest = args.child.split(":")
    if kind == "append":
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            result, loop = _run(appends(f"{tmp}/log", rest[0], args.appenders, args.duration))
    elif kind == "build":
        result, loop = _run(build(rest[0], int(rest[1]), int(rest[2])))
    else:
        path, snapshot, keys, memory = rest[0], rest[1] == "1", int(rest[2]), rest[3] == "1"
        result, loop = _run(opening(path, snapshot, keys, memory))
    print(json.dumps({**result, "loop": loop}))


def spawn(args: argparse.Namespace, spec: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", spec, "--duration", str(args.duration)]
    cmd += ["--appenders", str(args.appenders)] + (["--dir", args.dir] if args.dir else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per timed window")
    p.add_argument("--reps", type=int, default=3, help="repetitions (interleaved)")
    p.add_argument("--appenders", type=int, default=256, help="concurrent appenders")
    p.add_argument("--records", type=int, default=1_000_000, help="records in the open test")
    p.add_argument("--only", choices=("append", "open"), default=None)
    p.add_argument("--dir", default=None, help="parent directory for the logs (a real disk)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args)
        return
    print(
        f"# walasync {walasync.__version__} | python {platform.python_version()} | "
        f"{platform.platform()} | cpus {os.cpu_count()}"
    )
    if args.only in (None, "append"):
        results: dict[str, list[dict[str, Any]]] = {"raw": [], "keyed": []}
        loop = "?"
        for _ in range(args.reps):
            for impl in results:
                rep = spawn(args, f"append:{impl}")
                loop = rep["loop"]
                results[impl].append(rep)
        print(
            f"\n{args.appenders} appenders, 100 B values under 16 B keys ({loop}, "
            f"{args.duration:g} s windows, medians of {args.reps})\n"
        )
        print("| impl | appends/s | range | CPU µs/append | × raw |")  # noqa: RUF001
        print("| --- | ---: | ---: | ---: | ---: |")
        raw = statistics.median(r["rate"] for r in results["raw"])
        for impl, reps in results.items():
            rates = [r["rate"] for r in reps]
            cpu = statistics.median(r["cpu_us"] for r in reps)
            label = "`Wal.append` (same bytes)" if impl == "raw" else "`KeyedLog.append`"
            print(
                f"| {label} | {statistics.median(rates):,.0f} | {min(rates):,.0f}-"
                f"{max(rates):,.0f} | {cpu:.2f} | {statistics.median(rates) / raw:.2f} |"
            )
    if args.only in (None, "open"):
        print(f"\nopen of {args.records:,} keyed records (ms, medians of {args.reps})\n")
        print(
            "| keys | records/key | snapshot | open ms | replayed | index B/key | "
            "KEYINDEX MB | latest p50 µs | p99 µs | records_for(10) ms |"
        )
        print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for keys in (args.records, args.records // 10):
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                with_snap, without = f"{tmp}/snap", f"{tmp}/replay"
                spawn(args, f"build:{with_snap}:{args.records}:{keys}")
                shutil.copytree(with_snap, without)
                os.unlink(os.path.join(without, "KEYINDEX"))
                size = os.path.getsize(os.path.join(with_snap, "KEYINDEX")) / 1e6
                runs: dict[str, list[dict[str, Any]]] = {"1": [], "0": []}
                for _ in range(args.reps):
                    for snap, path in (("1", with_snap), ("0", without)):
                        runs[snap].append(spawn(args, f"open:{path}:{snap}:{keys}:0"))
                for snap, path in (("1", with_snap), ("0", without)):
                    mem = spawn(args, f"open:{path}:{snap}:{keys}:1")
                    reps = runs[snap]

                    def med(field: str, reps: list[dict[str, Any]] = reps) -> float:
                        return statistics.median(r[field] for r in reps)

                    print(
                        f"| {keys:,} | {args.records // keys} | {'yes' if snap == '1' else 'no'}"
                        f" | {med('open_ms'):,.0f} | {reps[0]['replayed']:,} | "
                        f"{mem['bytes_per_key']:.0f} | {size if snap == '1' else 0:.1f} | "
                        f"{med('latest_p50_us'):.0f} | {med('latest_p99_us'):.0f} | "
                        f"{med('records_for_ms'):.2f} |"
                    )


if __name__ == "__main__":
    main()
