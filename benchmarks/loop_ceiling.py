"""How fast can the event loop alone go? walasync's appends with the disk taken out.

Two rates, side by side, for N coroutines appending 100-byte records in a loop:

* ``walasync``: `await wal.append(rec)` on an I/O layer (the public `walasync.FileIO` seam)
  whose durable writes are no-ops, so everything but the write runs: the loop-side cost of
  group commit.
* ``floor``: no walasync at all: a coroutine awaiting a future that is resolved in bulk,
  once per loop pass: what asyncio costs per await.

The gap between ``floor`` and ``walasync`` is walasync's own per-append work; the gap between
``walasync`` and a real run of bench_batching.py is the disk and the hand-offs to the I/O
thread.

With ``--baseline DIR`` it compares instead this walasync with the one in source tree DIR (a
checkout of an earlier commit: ``git worktree add DIR main``), loaded in the same process
under another name, in alternating rounds (``--repeats``, order swapped every round): each
round gives appends/s and CPU time per append (the process's, all threads), and the ratios
of back-to-back rounds are summarised by their median. CPU per append is the steadier
measure on a shared machine: it does not count the time other processes took. Usage::

    python benchmarks/loop_ceiling.py [--concurrency 256,1024] [--duration 2] [--loop uvloop]
    python benchmarks/loop_ceiling.py --baseline ../base --concurrency 256 --repeats 10
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import walasync

RECORD = b"x" * 100


async def rate(n: int, duration: float, append: Callable[[bytes], Awaitable[object]]) -> float:
    """Appends per second from `n` coroutines calling `append` until the deadline."""
    count, seconds = await counted(n, duration, append)
    return count / seconds


async def counted(
    n: int, duration: float, append: Callable[[bytes], Awaitable[object]]
) -> tuple[int, float]:
    """How many appends `n` coroutines calling `append` made, and in how many seconds."""
    count = 0
    stop = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await append(RECORD)
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n)))
    return count, time.perf_counter() - start


class NoWrites(walasync.FileIO):
    """An I/O layer whose durable writes (batches, and zeros written ahead) do nothing."""

    def write_durable(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        pass


async def walasync_rate(n: int, duration: float) -> float:
    count, seconds = await walasync_counted(n, duration)
    return count / seconds


async def walasync_counted(n: int, duration: float, package: Any = walasync) -> tuple[int, float]:
    """`counted` for `package`'s walasync (this one by default) on a `NoWrites` I/O layer;
    the CPU time is the process's over the appends (not the open and close)."""
    io = NoWrites() if package is walasync else no_writes(package)
    with tempfile.TemporaryDirectory() as tmp:
        async with package.open(tmp, io=io) as wal:
            cpu = time.process_time()
            count, _ = await counted(n, duration, wal.append)
            return count, time.process_time() - cpu


def no_writes(package: Any) -> Any:
    """`NoWrites` for another copy of walasync (its own `FileIO`)."""

    class BaselineNoWrites(package.FileIO):  # type: ignore[misc, name-defined]
        def write_durable(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
            pass

    return BaselineNoWrites()


def load_baseline(tree: str) -> ModuleType:
    """The walasync package of source tree `tree`, imported as `walasync_baseline` (its
    imports of itself are relative, so it runs beside this one)."""
    init = Path(tree, "walasync", "__init__.py")
    spec = importlib.util.spec_from_file_location(
        "walasync_baseline", init, submodule_search_locations=[str(init.parent)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"no walasync package in {tree}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["walasync_baseline"] = module
    spec.loader.exec_module(module)
    return module


def compare(args: argparse.Namespace, new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """This walasync against the baseline tree's, in alternating rounds."""
    base = load_baseline(args.baseline)
    print(f"# this: {Path(walasync.__file__).parent} | baseline: {Path(base.__file__).parent}")
    print(f"{'N':>6} {'round':>5} {'impl':>8} {'appends/s':>11} {'CPU us/append':>14}")
    for n in map(int, args.concurrency.split(",")):
        runs: dict[str, list[tuple[float, float]]] = {"this": [], "baseline": []}
        for r in range(args.repeats):
            order = [("this", walasync), ("baseline", base)]
            for name, package in order if r % 2 == 0 else order[::-1]:
                loop = new_loop()
                try:
                    start = time.perf_counter()
                    count, cpu = loop.run_until_complete(
                        walasync_counted(n, args.duration, package)
                    )
                    wall = count / (time.perf_counter() - start)
                finally:
                    loop.close()
                runs[name].append((wall, cpu / count * 1e6))
                print(f"{n:>6} {r:>5} {name:>8} {wall:>11,.0f} {cpu / count * 1e6:>14.3f}")
        for i, what, fmt in ((0, "appends/s", ",.0f"), (1, "CPU us/append", ".3f")):
            ratios = sorted(
                a[i] / b[i] for a, b in zip(runs["this"], runs["baseline"], strict=True)
            )
            meds = [statistics.median(x[i] for x in runs[k]) for k in ("this", "baseline")]
            print(
                f"# N={n} {what}: this {meds[0]:{fmt}}, baseline {meds[1]:{fmt}}; this/baseline "
                f"per round: median {statistics.median(ratios):.3f} "
                f"(range {ratios[0]:.3f}-{ratios[-1]:.3f}, {len(ratios)} rounds)"
            )


async def floor_rate(n: int, duration: float) -> float:
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future[None]] = []
    scheduled = False

    def flush() -> None:
        nonlocal scheduled, pending
        scheduled = False
        batch, pending = pending, []
        for fut in batch:
            fut.set_result(None)

    def append(_: bytes) -> asyncio.Future[None]:
        nonlocal scheduled
        fut = loop.create_future()
        pending.append(fut)
        if not scheduled:
            scheduled = True
            loop.call_soon(flush)
        return fut

    return await rate(n, duration, append)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="256,1024")
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--baseline", metavar="DIR", help="compare with walasync from DIR")
    parser.add_argument("--repeats", type=int, default=10, help="rounds of each (--baseline)")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        new_loop = asyncio.new_event_loop
    if args.baseline is not None:
        compare(args, new_loop)
        return
    print(f"{'N':>6} {'walasync':>12} {'floor':>12}   (appends/s, {args.loop})")
    for n in map(int, args.concurrency.split(",")):
        loop = new_loop()
        try:
            whole = loop.run_until_complete(walasync_rate(n, args.duration))
            floor = loop.run_until_complete(floor_rate(n, args.duration))
        finally:
            loop.close()
        print(f"{n:>6} {whole:>12,.0f} {floor:>12,.0f}")


if __name__ == "__main__":
    main()
