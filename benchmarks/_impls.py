"""walasync on both loops, and the file baselines: raw limit, per-record fsync (threads and
aiofiles). Each ``run_*`` runs one repetition of a `Spec` in the current (child) process.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _common import (
    MAX_DURABLE_BYTES,
    Probe,
    Rep,
    Skip,
    Spec,
    Window,
    make_rep,
    open_target,
    run_threads,
)

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


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


def run_loop(loop_factory: LoopFactory | None, main: Callable[[], Any]) -> Any:
    """Run coroutine function ``main`` to completion on a fresh loop (no asyncio.Runner: 3.10)."""
    loop = (loop_factory or asyncio.new_event_loop)()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def batch_counter() -> Any:
    """An I/O layer that counts walasync's durable batches inside its window, through the
    public seam (`walasync.FileIO`).

    A batch is one ``write_durable`` of a header and a body (one pwritev2(RWF_DSYNC), or a
    write plus an fdatasync); zeros written ahead and seals are one buffer. The record count
    is the header's (README, "On-disk format").
    """
    import walasync

    class BatchCounter(walasync.FileIO):
        def __init__(self) -> None:
            self.win = Window(0, 0)
            self.batches = 0
            self.records = 0

        def write_durable(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
            super().write_durable(fd, buffers, offset)
            if len(buffers) == 2 and self.win.holds(time.perf_counter_ns()):
                self.batches += 1
                self.records += int.from_bytes(buffers[0][12:16], "little")

        def per_sync(self) -> float | None:
            return self.records / self.batches if self.batches else None

    return BatchCounter()


async def _walasync_cell(spec: Spec, counter: Any) -> Rep:
    import walasync

    opts: dict[str, Any] = {}
    if spec.segment_size is not None:
        opts["segment_size"] = spec.segment_size
    steady = spec.impl == "walasync-steady"
    segment = spec.segment_size or walasync.Options.segment_size
    if steady:  # a log that has run for a while: retention drops, freed files are recycled
        opts["retention_bytes"] = STEADY_SEGMENTS * segment
    wal = await walasync.open(spec.path, io=counter, **opts)
    if steady:
        unit = [b"p" * 4096] * 256
        for _ in range((STEADY_SEGMENTS + 2) * segment // (4096 * 256)):
            await wal.append_many(unit)
        await wal.apply_retention()
    lat: list[int] = []
    win = Window.of(spec)
    counter.win = win
    probe = Probe(win)
    record = spec.record()

    async def one() -> None:
        append, clock, start, end = wal.append, time.perf_counter_ns, win.start, win.end
        while (t0 := clock()) < end:
            await append(record)
            t1 = clock()
            if start <= t1 < end:
                lat.append(t1 - t0)

    async def many() -> None:
        append_many, clock, start, end = wal.append_many, time.perf_counter_ns, win.start, win.end
        unit = spec.unit()
        while (t0 := clock()) < end:
            await append_many(unit)
            t1 = clock()
            if start <= t1 < end:
                lat.append(t1 - t0)

    worker = one if spec.batch == 1 else many
    try:
        await asyncio.gather(*(worker() for _ in range(spec.n)))
    finally:
        await wal.close()
    return make_rep(spec, lat, win, probe, per_sync=counter.per_sync())


STEADY_SEGMENTS = 2  # walasync-steady: retention_bytes in segments


def run_walasync(spec: Spec, uvloop: bool) -> Rep:
    """N coroutines appending to a fresh walasync log on the default loop or uvloop."""
    _ensure_walasync_importable()
    factory = uvloop_factory() if uvloop else None
    counter = batch_counter()
    rep: Rep = run_loop(factory, lambda: _walasync_cell(spec, counter))
    return rep


# --------------------------------------------------------------------------- baselines


def run_raw(spec: Spec) -> Rep:
    """One thread writing rounds of N ops' records, as pwritev + fdatasync per batch.

    A round is split into batches of at most MAX_DURABLE_BYTES (never splitting an op), as
    walasync's batches are; a record counts once its batch is durable, and its latency is its
    round's time (every op of a round waits for the whole round).
    """
    record = spec.record(b"r")
    op_bytes = spec.batch * spec.size
    ops_per_batch = max(1, min(spec.n, MAX_DURABLE_BYTES // op_bytes))
    batches = [ops_per_batch] * (spec.n // ops_per_batch)
    if spec.n % ops_per_batch:
        batches.append(spec.n % ops_per_batch)
    iovs = {
        k: [[record] * min(IOV_MAX, k * spec.batch - i) for i in range(0, k * spec.batch, IOV_MAX)]
        for k in set(batches)
    }
    fd, ring = open_target(spec.path, spec.append_file)
    offset = 0
    lat: list[int] = []
    records = syncs = 0
    win = Window.of(spec)
    probe = Probe(win)
    clock, start, end = time.perf_counter_ns, win.start, win.end
    try:
        while (t0 := clock()) < end:
            for k in batches:
                size = k * op_bytes
                if ring and offset + size > ring:
                    offset = 0
                for iov in iovs[k]:
                    offset += os.pwritev(fd, iov, offset)
                os.fdatasync(fd)
                if start <= clock() < end:
                    records += k * spec.batch
                    syncs += 1
            t1 = clock()
            if start <= t1 < end:
                lat.append(t1 - t0)
    finally:
        os.close(fd)
    return make_rep(
        spec, lat, win, probe, records=records, per_sync=records / syncs if syncs else None
    )


def run_per_record(spec: Spec) -> Rep:
    """min(N, max_threads) threads doing write + fdatasync per op under one lock."""
    unit = spec.unit(b"p")
    size = len(unit) * spec.size
    fd, ring = open_target(spec.path, spec.append_file)
    lock = threading.Lock()
    offset = 0

    def make_op(index: int, win: Window) -> Callable[[int], bool]:
        def op(k: int) -> bool:
            nonlocal offset
            with lock:
                if time.perf_counter_ns() >= win.end:  # don't drain the lock queue past the end
                    return False
                if ring and offset + size > ring:
                    offset = 0
                offset += os.pwritev(fd, unit, offset)
                os.fdatasync(fd)
            return True

        return op

    try:
        return run_threads(spec, make_op, per_sync=lambda: float(spec.batch))
    finally:
        os.close(fd)


async def _aiofiles_cell(spec: Spec) -> Rep:
    try:
        import aiofiles
    except ImportError as exc:
        raise Skip("aiofiles not installed") from exc
    fd0, ring = open_target(spec.path, spec.append_file)
    os.close(fd0)
    data = b"".join(spec.unit(b"a"))
    lock = asyncio.Lock()
    offset = 0
    lat: list[int] = []
    async with aiofiles.open(spec.path, "r+b") as f:
        fd = f.fileno()
        win = Window.of(spec)
        probe = Probe(win)

        async def worker() -> None:
            nonlocal offset
            clock, start, end = time.perf_counter_ns, win.start, win.end
            while (t0 := clock()) < end:
                async with lock:
                    if clock() >= end:
                        break
                    if ring and offset + len(data) > ring:
                        offset = await f.seek(0)
                    await f.write(data)
                    await f.flush()
                    await asyncio.to_thread(os.fdatasync, fd)
                    offset += len(data)
                t1 = clock()
                if start <= t1 < end:
                    lat.append(t1 - t0)

        await asyncio.gather(*(worker() for _ in range(spec.n)))
    return make_rep(spec, lat, win, probe, per_sync=float(spec.batch))


def run_aiofiles(spec: Spec) -> Rep:
    """N coroutines on the default loop: under an asyncio.Lock, aiofiles write + flush, then
    fdatasync in a thread, per op."""
    rep: Rep = run_loop(None, lambda: _aiofiles_cell(spec))
    return rep
