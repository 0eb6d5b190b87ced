"""StateLog against the bare log: what applying costs over appending, and what checkpoints
and replay cost. On uvloop when it is installed::

    python benchmarks/bench_statelog.py [--duration 2] [--repeats 3] [--keys 100000] [--dir DIR]

* ``apply``: events/s of N coroutines each calling ``StateLog.apply`` in a loop (a
  key-value state; JSON events of about 60 bytes) beside N coroutines each calling
  ``Wal.append`` with the same bytes, side by side in one run, interleaved, medians;
* ``checkpoint``: a state of KEYS keys: the time the loop is held (encoding the state and
  decoding it back), the whole ``checkpoint()``, the snapshot's size;
* ``open``: opening with every event in the log (replay), then from the snapshot.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Coroutine
from typing import Any

import walasync

Doc = dict[str, Any]


def put(state: dict[str, Any], event: Doc) -> dict[str, Any]:
    state[event["k"]] = event["v"]
    return state


def event(i: int) -> Doc:
    return {"k": f"key{i % 1000}", "v": i, "note": "x" * 30}


PAYLOAD = json.dumps(event(0), separators=(",", ":")).encode()


async def rate(n: int, duration: float, step: Any) -> float:
    """Events/s of `n` coroutines calling `step(i)` in a loop for `duration` seconds."""
    done = 0
    stop = False

    async def worker(w: int) -> None:
        nonlocal done
        for i in itertools.count(w * 10**9):
            if stop:
                return
            await step(i)
            done += 1

    tasks = [asyncio.ensure_future(worker(w)) for w in range(n)]
    await asyncio.sleep(0.2)  # warm up
    start, before = time.perf_counter(), done
    await asyncio.sleep(duration)
    count, elapsed = done - before, time.perf_counter() - start
    stop = True
    await asyncio.gather(*tasks)
    return count / elapsed


async def apply_vs_append(root: str, duration: float, repeats: int) -> None:
    print("apply vs append (events/s, median of repeats; range)")
    for n in (1, 16, 256):
        results: dict[str, list[float]] = {"Wal.append": [], "StateLog.apply": []}
        for r in range(repeats):
            path = os.path.join(root, f"a{n}.{r}")
            async with walasync.open(path) as wal:
                results["Wal.append"].append(await rate(n, duration, lambda i: wal.append(PAYLOAD)))
            shutil.rmtree(path)
            async with walasync.StateLog.open(
                path, initial=dict, apply=put, checkpoint_bytes=None
            ) as s:
                results["StateLog.apply"].append(
                    await rate(n, duration, lambda i: s.apply(event(i)))
                )
            shutil.rmtree(path)
        for name, values in results.items():
            print(
                f"  N={n:<4} {name:15s} {statistics.median(values):>10,.0f}"
                f"   {min(values):,.0f}-{max(values):,.0f}"
            )


async def checkpoint_and_open(root: str, keys: int) -> None:
    path = os.path.join(root, "c")
    async with walasync.StateLog.open(path, initial=dict, apply=put, checkpoint_bytes=None) as s:
        unit = 1000
        for start in range(0, keys, unit):
            await asyncio.gather(
                *(
                    s.apply({"k": f"key{i}", "v": i, "note": "x" * 30})
                    for i in range(start, start + unit)
                )
            )
        t = time.perf_counter()
        encoded = json.dumps(s.state, separators=(",", ":")).encode()
        json.loads(encoded)
        held = time.perf_counter() - t
        t = time.perf_counter()
        await s.checkpoint()
        whole = time.perf_counter() - t
        size = (await asyncio.to_thread(os.stat, os.path.join(path, "STATE"))).st_size
    print(
        f"checkpoint of {keys:,} keys: loop held {held * 1000:.0f} ms (encode + decode), "
        f"checkpoint() {whole * 1000:.0f} ms, snapshot {size / 1e6:.1f} MB"
    )
    replay = os.path.join(root, "r")
    async with walasync.StateLog.open(replay, initial=dict, apply=put, checkpoint_bytes=None) as s:
        unit = 1000
        for start in range(0, keys, unit):
            await asyncio.gather(
                *(
                    s.apply({"k": f"key{i}", "v": i, "note": "x" * 30})
                    for i in range(start, start + unit)
                )
            )
    for name, where in (("replaying every event", replay), ("from the snapshot", path)):
        t = time.perf_counter()
        async with walasync.StateLog.open(where, initial=dict, apply=put) as s:
            assert len(s.state) == keys
        print(f"open, {name}: {(time.perf_counter() - t) * 1000:.0f} ms")


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--dir", default=None, help="where to put the logs (default: a temp dir)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(dir=args.dir, prefix="walasync-bench-")
    try:

        async def both() -> None:
            await apply_vs_append(root, args.duration, args.repeats)
            await checkpoint_and_open(root, args.keys)

        _run(both())
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
