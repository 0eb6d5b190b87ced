"""How fast can the event loop alone go? walasync's appends with the disk taken out.

Two rates, side by side, for N coroutines appending 100-byte records in a loop:

* ``walasync``: `await wal.append(rec)` on an I/O layer (the public `walasync.FileIO` seam)
  whose durable writes are no-ops, so everything but the write runs: the loop-side cost of
  group commit.
* ``floor``: no walasync at all: a coroutine awaiting a future that is resolved in bulk,
  once per loop pass: what asyncio costs per await.

The gap between ``floor`` and ``walasync`` is walasync's own per-append work; the gap between
``walasync`` and a real run of bench_batching.py is the disk and the hand-offs to the I/O
thread. Usage::

    python benchmarks/loop_ceiling.py [--concurrency 256,1024] [--duration 2] [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence

import walasync

RECORD = b"x" * 100


async def rate(n: int, duration: float, append: Callable[[bytes], Awaitable[object]]) -> float:
    """Appends per second from `n` coroutines calling `append` until the deadline."""
    count = 0
    stop = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await append(RECORD)
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n)))
    return count / (time.perf_counter() - start)


class NoWrites(walasync.FileIO):
    """An I/O layer whose durable writes (batches, and zeros written ahead) do nothing."""

    def write_durable(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        pass


async def walasync_rate(n: int, duration: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        async with walasync.open(tmp, io=NoWrites()) as wal:
            return await rate(n, duration, wal.append)


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
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        new_loop = asyncio.new_event_loop
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
