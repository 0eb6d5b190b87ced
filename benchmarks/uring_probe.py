"""Does io_uring remove the two thread wake-ups per group-commit batch? A probe, side by side.

N coroutines (1, 4, 16) each append 100-byte records in a loop; whatever is pending goes out
as one batch, one write plus one fdatasync (group commit, at most one batch being written
and one more handed over behind it, as walasync's pipeline). Paths, interleaved per round:

* ``raw``: one thread, no loop: ``os.pwrite`` of N records + ``os.fdatasync``, in a loop.
  The limit; a record's latency is its round's time.
* ``inline``: no hand-off: the loop itself blocks in pwrite + fdatasync. Zero wake-ups of
  ours; no library may block its caller's loop so, but it is the floor for the paths below.
* ``thread``: an asyncio loop hands each batch to one dedicated I/O thread, which does
  pwrite + fdatasync and wakes the loop with ``call_soon_threadsafe`` (what walasync does):
  two thread wake-ups per batch.
* ``uring``: the loop submits a linked WRITE + FSYNC(DATASYNC) pair to io_uring with one
  ``io_uring_enter`` that does not wait, and learns of the completion from an eventfd
  registered with the ring (IORING_REGISTER_EVENTFD) and watched by ``loop.add_reader``. No
  thread of ours; the kernel runs the fsync on its own worker (io-wq). The write's success
  posts no completion (IOSQE_CQE_SKIP_SUCCESS where the kernel has it), so a batch costs one
  eventfd wake-up. A batch queued while one is in flight is submitted from the completion
  callback, so a write never starts before the batch ahead of it is durable. Linux has no
  non-blocking fsync: io_uring runs FSYNC (and RWF_DSYNC writes) on a kernel worker thread
  of the process (io-wq, ``iou-wrk-PID``), so a thread still wakes per batch, without a GIL.
* ``uring-dsync``: the same with one WRITE flagged RWF_DSYNC instead of the linked pair
  (walasync's thread uses ``pwritev2(RWF_DSYNC)``).
* ``walasync``: walasync itself, ``await wal.append(record)`` (FSYNC durability).

io_uring is driven through raw system calls (ctypes ``syscall``, rings mapped with ``mmap``,
SQEs packed with ``struct``), x86_64 only: the PyPI ``liburing`` wheel (2026.3.30) is
built with AVX-512 and dies with SIGILL on CPUs without it (this project's machine). Where
io_uring is absent or refused (``kernel.io_uring_disabled``, a seccomp filter in a
container: EPERM or ENOSYS) the uring rows are skipped with the reason.

Each cell reports records/s, per-record latency p50/p99 (from the append call to its
acknowledgement), process CPU time per record (all threads, including the kernel's io-wq
workers, which belong to the process), records per batch, and sleeps per batch: voluntary
context switches of all the process's threads (getrusage), each a thread going to sleep and
later woken (fdatasync alone sleeps about twice here: the write, then the cache flush); as
medians over ``--repeats`` rounds; the order of the paths rotates every round. The
``uring/thread`` lines give the median of the per-round ratios, which resists a busy machine
better than a ratio of medians.

The baselines overwrite a zero-filled, synced 16 MiB ring (as bench_batching.py's raw) in a
temporary directory under the repository's ``.bench-tmp`` (a real disk, not tmpfs), removed
at the end, also on Ctrl-C or SIGTERM. Usage::

    python benchmarks/uring_probe.py [--concurrency 1,4,16] [--loop asyncio,uvloop]
        [--duration 2] [--repeats 5] [--impl raw,inline,thread,uring,uring-dsync,walasync]
    python benchmarks/uring_probe.py --duration 0.5 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import mmap
import os
import platform
import queue
import resource
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from _common import RING_SIZE, open_target, percentile

import walasync

RECORD = b"u" * 100
WARMUP = 0.25  # seconds before each timed window (at most a quarter of the window)
IMPLS = ("raw", "inline", "thread", "uring", "uring-dsync", "walasync")

# io_uring ABI (include/uapi/linux/io_uring.h), x86_64 system call numbers.
_SYS_SETUP, _SYS_ENTER, _SYS_REGISTER = 425, 426, 427
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_FEAT_SINGLE_MMAP, _FEAT_CQE_SKIP = 1 << 0, 1 << 11
_REGISTER_EVENTFD = 4
_OP_FSYNC, _OP_WRITE = 3, 23
_SQE_IO_LINK, _SQE_CQE_SKIP_SUCCESS = 1 << 2, 1 << 6
_FSYNC_DATASYNC = 1
_RWF_DSYNC = 0x2
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")  # 64 bytes
_CQE = struct.Struct("<QiI")  # 16 bytes
_U32 = 0xFFFFFFFF

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _sys(number: int, *args: int | ctypes.Array[ctypes.c_char] | None) -> int:
    """A system call; raises OSError on failure."""
    ret: int = _syscall(ctypes.c_long(number), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _address(buf: bytes) -> int:
    """Where `buf`'s bytes live (no copy); the caller keeps `buf` alive meanwhile."""
    return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value or 0


class Uring:
    """A minimal io_uring: set up, mapped, fed SQEs and reaped by hand (x86_64: its stores
    and loads are not reordered with each other, so plain ones do as ring barriers)."""

    def __init__(self, entries: int = 8) -> None:
        if platform.machine() != "x86_64":
            raise OSError(
                errno.ENOSYS, f"this probe's io_uring is x86_64 only, not {platform.machine()}"
            )
        params = bytearray(120)
        self.fd = _sys(_SYS_SETUP, entries, (ctypes.c_char * 120).from_buffer(params))
        sq_entries, cq_entries, _, _, _, self.features = struct.unpack_from("<6I", params, 0)
        sq = struct.unpack_from(
            "<8I", params, 40
        )  # head, tail, mask, entries, flags, dropped, array
        cq = struct.unpack_from("<8I", params, 80)  # head, tail, mask, entries, overflow, cqes
        sq_size, cq_size = sq[6] + sq_entries * 4, cq[5] + cq_entries * _CQE.size
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if self.features & _FEAT_SINGLE_MMAP:
            sq_size = cq_size = max(sq_size, cq_size)
        self._sq_map = mmap.mmap(self.fd, sq_size, mmap.MAP_SHARED, prot, offset=_OFF_SQ_RING)
        self._cq_map = (
            self._sq_map
            if self.features & _FEAT_SINGLE_MMAP
            else mmap.mmap(self.fd, cq_size, mmap.MAP_SHARED, prot, offset=_OFF_CQ_RING)
        )
        self._sqes = mmap.mmap(
            self.fd, sq_entries * _SQE.size, mmap.MAP_SHARED, prot, offset=_OFF_SQES
        )
        self._sq = memoryview(self._sq_map).cast("I")
        self._cq = memoryview(self._cq_map).cast("I")
        self._sq_tail, self._sq_mask = sq[1] // 4, self._sq[sq[2] // 4]
        self._cq_head, self._cq_tail, self._cq_mask = cq[0] // 4, cq[1] // 4, self._cq[cq[2] // 4]
        self._cqes = cq[5]
        for i in range(sq_entries):  # the SQ array maps slot i to SQE i, once for all
            self._sq[sq[6] // 4 + i] = i
        self.skip_success = _SQE_CQE_SKIP_SUCCESS if self.features & _FEAT_CQE_SKIP else 0

    def register_eventfd(self, efd: int) -> None:
        """Have every completion signal `efd`."""
        arg = (ctypes.c_char * 4).from_buffer(bytearray(struct.pack("<i", efd)))
        _sys(_SYS_REGISTER, self.fd, _REGISTER_EVENTFD, arg, 1)

    def submit(self, sqes: list[tuple[int, int, int, int, int, int, int, int]]) -> None:
        """Queue SQEs (opcode, flags, fd, offset, address, length, op flags, user data) and
        submit them with one io_uring_enter that does not wait for completions."""
        tail = self._sq[self._sq_tail]
        for op, flags, fd, off, addr, length, op_flags, data in sqes:
            _SQE.pack_into(
                self._sqes, (tail & self._sq_mask) * 64, op, flags, 0, fd, off, addr, length,
                op_flags, data, 0, 0, 0, 0, 0,
            )  # fmt: skip
            tail = (tail + 1) & _U32
        self._sq[self._sq_tail] = tail
        done = _sys(_SYS_ENTER, self.fd, len(sqes), 0, 0, None, 0)
        if done != len(sqes):
            raise OSError(errno.EAGAIN, f"io_uring took {done} of {len(sqes)} SQEs")

    def reap(self) -> list[tuple[int, int]]:
        """The completions posted so far: (user data, result) each."""
        head, tail = self._cq[self._cq_head], self._cq[self._cq_tail]
        out = []
        while head != tail:
            data, res, _ = _CQE.unpack_from(self._cq_map, self._cqes + (head & self._cq_mask) * 16)
            out.append((data, res))
            head = (head + 1) & _U32
        self._cq[self._cq_head] = head
        return out

    def close(self) -> None:
        self._sq.release()
        self._cq.release()
        for m in {id(m): m for m in (self._sq_map, self._cq_map, self._sqes)}.values():
            m.close()
        os.close(self.fd)


def uring_unavailable() -> str | None:
    """Why io_uring cannot be used here, or None if a ring and an eventfd can be set up."""
    try:
        ring = Uring()
    except OSError as exc:
        why = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        disabled = Path("/proc/sys/kernel/io_uring_disabled")
        extra = f", io_uring_disabled={disabled.read_text().strip()}" if disabled.exists() else ""
        return f"io_uring_setup failed: {why}{extra}"
    try:
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            ring.register_eventfd(efd)
        finally:
            os.close(efd)
    except OSError as exc:
        return f"IORING_REGISTER_EVENTFD failed: {exc}"
    finally:
        ring.close()
    return None


Done = Callable[[object, "BaseException | None"], None]


class InlineDevice:
    """No hand-off at all: the loop itself blocks in pwrite + fdatasync (zero wake-ups; not
    something a library may do to its caller's loop, but the floor for the async paths)."""

    def __init__(self, fd: int, done: Done) -> None:
        self._fd, self._done = fd, done

    def submit(self, buf: bytes, offset: int, token: object) -> None:
        exc: BaseException | None = None
        try:
            os.pwrite(self._fd, buf, offset)
            os.fdatasync(self._fd)
        except OSError as e:
            exc = e
        self._done(token, exc)

    def close(self) -> None:
        pass


class ThreadDevice:
    """One I/O thread: pwrite + fdatasync per batch, then `call_soon_threadsafe(done)`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, done: Done) -> None:
        self._loop, self._fd, self._done = loop, fd, done
        self._queue: queue.SimpleQueue[tuple[bytes, int, object] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="probe-io", daemon=True)
        self._thread.start()

    def submit(self, buf: bytes, offset: int, token: object) -> None:
        self._queue.put((buf, offset, token))

    def _main(self) -> None:
        while (item := self._queue.get()) is not None:
            buf, offset, token = item
            exc: BaseException | None = None
            try:
                os.pwrite(self._fd, buf, offset)
                os.fdatasync(self._fd)
            except OSError as e:
                exc = e
            self._loop.call_soon_threadsafe(self._done, token, exc)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class UringDevice:
    """Batches through io_uring, completions through an eventfd in the loop's selector; one
    batch in the kernel at a time, the others wait here in order."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, fd: int, done: Done, dsync: bool = False
    ) -> None:
        self._loop, self._fd, self._done, self._dsync = loop, fd, done, dsync
        self._ring = Uring()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ring.register_eventfd(self._efd)
        loop.add_reader(self._efd, self._reap)
        self._busy: tuple[bytes, object] | None = None  # the batch in the kernel (buf kept alive)
        self._seq = 0  # the batch in the kernel: its CQEs carry seq << 1 (write), seq << 1 | 1
        self._waiting: deque[tuple[bytes, int, object]] = deque()
        self.wakeups = 0  # eventfd reads: times the loop woke for completions

    def submit(self, buf: bytes, offset: int, token: object) -> None:
        if self._busy is not None:
            self._waiting.append((buf, offset, token))
        else:
            self._start(buf, offset, token)

    def _start(self, buf: bytes, offset: int, token: object) -> None:
        self._busy = (buf, token)
        self._seq += 1
        addr, n, fd, last = _address(buf), len(buf), self._fd, self._seq << 1 | 1
        if self._dsync:
            self._ring.submit([(_OP_WRITE, 0, fd, offset, addr, n, _RWF_DSYNC, last)])
        else:  # the write reports a failure only (where the kernel can skip successes)
            link = _SQE_IO_LINK | self._ring.skip_success
            self._ring.submit(
                [
                    (_OP_WRITE, link, fd, offset, addr, n, 0, self._seq << 1),
                    (_OP_FSYNC, 0, fd, 0, 0, 0, _FSYNC_DATASYNC, last),
                ]
            )

    def _reap(self) -> None:
        self.wakeups += 1
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        for data, res in self._ring.reap():
            if self._busy is None or data >> 1 != self._seq:
                continue  # the cancelled fdatasync of a batch whose write failed
            buf, token = self._busy
            is_write = self._dsync or not data & 1
            if res < 0 or (is_write and res != len(buf)):  # failed, or a short write
                exc: BaseException | None = OSError(
                    -res if res < 0 else errno.EIO, os.strerror(-res) if res < 0 else "short write"
                )
            elif data & 1:
                exc = None
            else:
                continue  # the write went well (a kernel without IOSQE_CQE_SKIP_SUCCESS)
            self._busy = None
            if self._waiting:  # the next batch goes to the kernel before anyone is woken
                self._start(*self._waiting.popleft())
            self._done(token, exc)

    def close(self) -> None:
        self._loop.remove_reader(self._efd)
        os.close(self._efd)
        self._ring.close()


class GroupCommit:
    """The loop side of group commit: `append` queues a record; a send scheduled with
    `call_soon` takes everything pending as one batch, at most `depth` batches handed over."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, kind: str, depth: int = 2) -> None:
        self._loop, self._depth = loop, depth
        self._futures: list[asyncio.Future[None]] = []
        self._records: list[bytes] = []
        self._scheduled = False
        self._in_flight = 0
        self._pos = 0  # where the next batch goes in the ring
        self.batches = 0
        self.device: InlineDevice | ThreadDevice | UringDevice
        if kind == "inline":
            self.device = InlineDevice(fd, self._acked)
        elif kind == "thread":
            self.device = ThreadDevice(loop, fd, self._acked)
        else:
            self.device = UringDevice(loop, fd, self._acked, dsync=kind == "uring-dsync")

    def append(self, record: bytes) -> asyncio.Future[None]:
        fut = self._loop.create_future()
        self._records.append(record)
        self._futures.append(fut)
        if not self._scheduled and self._in_flight < self._depth:
            self._scheduled = True
            self._loop.call_soon(self._send)
        return fut

    def _send(self) -> None:
        self._scheduled = False
        if not self._records or self._in_flight >= self._depth:
            return
        buf = b"".join(self._records)
        futures, self._records, self._futures = self._futures, [], []
        if self._pos + len(buf) > RING_SIZE:
            self._pos = 0
        offset, self._pos = self._pos, self._pos + len(buf)
        self._in_flight += 1
        self.device.submit(buf, offset, futures)

    def _acked(self, token: object, exc: BaseException | None) -> None:
        self._in_flight -= 1
        self.batches += 1
        assert isinstance(token, list)
        for fut in token:
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
        if self._records and not self._scheduled:
            self._scheduled = True  # after the appenders just woken have appended again
            self._loop.call_soon(self._send)


@dataclass
class Result:
    records: int
    seconds: float
    cpu: float
    lat_ns: list[int] = field(default_factory=list)
    batches: int = 0  # durable writes in the window (0: not counted)
    wakeups: int = 0  # eventfd wake-ups of the loop in the window (uring only)
    switches: int = 0  # voluntary context switches of the process's threads in the window

    @property
    def rate(self) -> float:
        return self.records / self.seconds


async def drive(
    n: int,
    duration: float,
    append: Callable[[bytes], Awaitable[object]],
    stats: Callable[[], tuple[int, int]] = lambda: (0, 0),
) -> Result:
    """`n` coroutines awaiting `append(RECORD)` in a loop; counts what completes in the window.
    `stats()` gives counters of batches and wake-ups, read at both edges of the window."""
    counting = stopping = False
    count = 0
    lat: list[int] = []
    clock = time.perf_counter_ns

    async def appender() -> None:
        nonlocal count
        while not stopping:
            t0 = clock()
            await append(RECORD)
            if counting:
                lat.append(clock() - t0)
                count += 1

    tasks = [asyncio.ensure_future(appender()) for _ in range(n)]
    await asyncio.sleep(min(WARMUP, duration / 4))
    cpu0, t0, counting, s0, v0 = time.process_time(), time.perf_counter(), True, stats(), _vcsw()
    await asyncio.sleep(duration)
    counting, stopping = False, True
    cpu1, t1, s1, v1 = time.process_time(), time.perf_counter(), stats(), _vcsw()
    await asyncio.gather(*tasks)
    return Result(count, t1 - t0, cpu1 - cpu0, lat, s1[0] - s0[0], s1[1] - s0[1], v1 - v0)


def _vcsw() -> int:
    """Voluntary context switches so far, all threads of the process (the kernel's io-wq
    workers included): each is a thread going to sleep, to be woken again."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


def run_raw(n: int, duration: float, fd: int) -> Result:
    """One thread: pwrite of `n` records + fdatasync per round; each record's latency is its
    round's time."""
    buf = RECORD * n
    pos, count, lat = 0, 0, []
    clock = time.perf_counter_ns
    start = clock() + int(min(WARMUP, duration / 4) * 1e9)
    end = start + int(duration * 1e9)
    cpu0 = cpu1 = None
    v0 = 0
    while (t0 := clock()) < end:
        if cpu0 is None and t0 >= start:
            cpu0, v0 = time.process_time(), _vcsw()
        if pos + len(buf) > RING_SIZE:
            pos = 0
        os.pwrite(fd, buf, pos)
        os.fdatasync(fd)
        pos += len(buf)
        t1 = clock()
        if start <= t0 and t1 < end:
            lat += [t1 - t0] * n
            count += n
    cpu1 = time.process_time()
    seconds = (end - start) / 1e9
    return Result(count, seconds, cpu1 - (cpu0 or cpu1), lat, count // n, 0, _vcsw() - v0)


def new_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_async(impl: str, loop_name: str, n: int, duration: float, fd: int, tmp: Path) -> Result:
    loop = new_loop(loop_name)
    try:
        if impl == "walasync":
            return loop.run_until_complete(run_walasync(n, duration, tmp))
        return loop.run_until_complete(run_group_commit(impl, n, duration, fd))
    finally:
        loop.close()


async def run_group_commit(kind: str, n: int, duration: float, fd: int) -> Result:
    gc = GroupCommit(asyncio.get_running_loop(), fd, kind)
    dev = gc.device
    try:
        return await drive(n, duration, gc.append, lambda: (gc.batches, getattr(dev, "wakeups", 0)))
    finally:
        gc.device.close()


async def run_walasync(n: int, duration: float, tmp: Path) -> Result:
    path = tempfile.mkdtemp(prefix="wal-", dir=tmp)
    try:
        async with walasync.open(path) as wal:
            return await drive(n, duration, wal.append, lambda: (wal.stats().batches, 0))
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so that the temporary directory is removed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--loop", default="asyncio,uvloop")
    p.add_argument("--impl", default=",".join(IMPLS))
    p.add_argument("--duration", type=float, default=2.0, help="seconds per timed window")
    p.add_argument("--repeats", type=int, default=5, help="rounds (medians over them)")
    p.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent / ".bench-tmp"))
    args = p.parse_args()
    conc = [int(x) for x in args.concurrency.split(",")]
    loops = args.loop.split(",")
    impls = args.impl.split(",")
    if unknown := set(impls) - set(IMPLS):
        p.error(f"unknown --impl {sorted(unknown)}")
    if any(i.startswith("uring") for i in impls) and (why := uring_unavailable()):
        print(f"# uring rows skipped: {why}")
        impls = [i for i in impls if not i.startswith("uring")]
    # rows: (loop or "-", impl); raw needs no loop
    rows = [("-", "raw")] if "raw" in impls else []
    rows += [(lp, i) for lp in loops for i in impls if i != "raw"]
    signal.signal(signal.SIGTERM, _sigterm)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="uring-probe-", dir=args.dir))
    results: dict[tuple[str, str, int], list[Result]] = {}
    try:
        fd, _ = open_target(str(tmp / "ring"), append=False)
        try:
            print(f"# {len(rows)} paths x {conc} appenders x {args.repeats} rounds of "
                  f"{args.duration} s, in {tmp} ({platform.release()}, {os.cpu_count()} CPUs)",
                  flush=True)  # fmt: skip
            for r in range(args.repeats):
                for n in conc:
                    k = (r * len(conc) + conc.index(n)) % len(rows)
                    for lp, impl in rows[k:] + rows[:k]:  # the order rotates every round
                        if impl == "raw":
                            res = run_raw(n, args.duration, fd)
                        else:
                            res = run_async(impl, lp, n, args.duration, fd, tmp)
                        results.setdefault((lp, impl, n), []).append(res)
                print(f"# round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        finally:
            os.close(fd)
    except KeyboardInterrupt:
        print("# interrupted", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, conc, rows)


def report(
    results: dict[tuple[str, str, int], list[Result]], conc: list[int], rows: list[tuple[str, str]]
) -> None:
    """The table of medians (and per-round uring/thread ratios) as Markdown."""
    print(
        "| loop | N | path | records/s | x raw | p50 us | p99 us | CPU us/record "
        "| records/batch | sleeps/batch | eventfd wake-ups/batch | rounds |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratios: list[str] = []
    for n in conc:
        raw = results.get(("-", "raw", n))
        raw_rate = statistics.median(x.rate for x in raw) if raw else None
        for lp, impl in rows:
            got = [x for x in results.get((lp, impl, n), []) if x.records]
            if not got:
                continue
            rate = statistics.median(x.rate for x in got)
            p50 = statistics.median(percentile(sorted(x.lat_ns), 0.5) or 0 for x in got)
            p99 = statistics.median(percentile(sorted(x.lat_ns), 0.99) or 0 for x in got)
            cpu = statistics.median(x.cpu / x.records * 1e6 for x in got)
            rel = f"{rate / raw_rate:.2f}" if raw_rate else "-"
            per = statistics.median(x.records / x.batches if x.batches else 0 for x in got)
            wake = statistics.median(x.wakeups / x.batches if x.batches else 0 for x in got)
            sleeps = statistics.median(x.switches / x.batches if x.batches else 0 for x in got)
            print(
                f"| {lp} | {n} | {impl} | {rate:,.0f} | {rel} | {p50:,.0f} | {p99:,.0f} "
                f"| {cpu:.1f} | {per:.1f} | {sleeps:.2f} "
                f"| {f'{wake:.2f}' if impl.startswith('uring') else '-'} "
                f"| {len(got)} |"
            )
        for lp in dict.fromkeys(lp for lp, _ in rows if lp != "-"):
            thread = results.get((lp, "thread", n), [])
            for impl in ("uring", "uring-dsync"):
                other = results.get((lp, impl, n), [])
                k = min(len(thread), len(other))  # rounds both ran (all, unless interrupted)
                if k:
                    pairs = list(zip(other[:k], thread[:k], strict=True))
                    rates = sorted(a.rate / b.rate for a, b in pairs)
                    cpus = sorted((a.cpu / a.records) / (b.cpu / b.records) for a, b in pairs)
                    ratios.append(
                        f"# {lp} N={n}: {impl}/thread per round, records/s: median "
                        f"{statistics.median(rates):.2f} (range {rates[0]:.2f}-{rates[-1]:.2f}); "
                        f"CPU/record: median {statistics.median(cpus):.2f} "
                        f"(range {cpus[0]:.2f}-{cpus[-1]:.2f})"
                    )
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
