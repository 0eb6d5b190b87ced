"""Shared pieces of the benchmark: one repetition's spec and result, the timed window, the
CPU/RSS probe, the preallocated target file and a generic multi-threaded driver.

Each repetition runs in its own child process (see ``bench_batching.py``) so that peak RSS
and CPU time are the repetition's own.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

RING_SIZE = 16 << 20  # baselines overwrite a preallocated ring of this size
MAX_DURABLE_BYTES = 4 << 20  # raw's largest write+fdatasync: walasync's max_batch_bytes
STRAGGLER_GRACE = 0.2  # seconds: see run_threads


class Skip(Exception):
    """Raised when an implementation cannot run here (e.g. an optional package is missing)."""


@dataclass(frozen=True)
class Spec:
    """What one repetition runs: sent to the child process as JSON."""

    impl: str
    workload: str  # "append": one record per op; "many": `batch` records per op
    n: int  # concurrency: coroutines (or threads, capped at max_threads)
    size: int  # record bytes
    batch: int  # records per op (1 for "append")
    duration: float
    warmup: float
    path: str  # a fresh path (file or directory) for this repetition
    max_threads: int = 256
    append_file: bool = False  # baselines append to a growing file instead of the ring
    segment_size: int | None = None  # walasync option
    rocksdb_binding: str | None = None  # "rocksdict" or "aimrocks", chosen by the parent
    baseline: str | None = None  # walasync-baseline: the source tree to import walasync from

    @property
    def threads(self) -> int:
        """Thread count of the thread-based implementations."""
        return min(self.n, self.max_threads)

    def record(self, fill: bytes = b"w") -> bytes:
        """One record of ``size`` bytes."""
        return fill * self.size

    def unit(self, fill: bytes = b"w") -> list[bytes]:
        """The records of one op."""
        return [self.record(fill)] * self.batch


@dataclass
class Rep:
    """The result of one repetition (what the child prints as JSON)."""

    records: int  # durable records completed inside the timed window
    seconds: float
    rate: float  # records/s
    mb_s: float  # record payload, 10**6 B/s
    p50_us: float | None  # latency of one op (an append, or one append_many of `batch`)
    p99_us: float | None
    p999_us: float | None
    max_us: float | None
    per_sync: float | None  # records per fdatasync (or per durable commit, see the notes)
    cpu_us: float | None  # process user+sys CPU per record over the window
    peak_rss_mib: float  # ru_maxrss of the child process at the end
    rss_delta_mib: float  # ... minus ru_maxrss just before the implementation started
    threads: int | None = None
    samples: int = 0  # latency samples behind the percentiles


@dataclass
class Window:
    """Timed window in perf_counter_ns: warm-up runs before ``start``; work stops at ``end``."""

    start: int
    end: int

    @classmethod
    def after(cls, warmup: float, duration: float) -> Window:
        """Window beginning ``warmup`` seconds from now and lasting ``duration`` seconds."""
        start = time.perf_counter_ns() + int(warmup * 1e9)
        return cls(start, start + int(duration * 1e9))

    @classmethod
    def of(cls, spec: Spec) -> Window:
        """A fresh window for ``spec``, starting after its warm-up."""
        return cls.after(spec.warmup, spec.duration)

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / 1e9

    def holds(self, t_ns: int) -> bool:
        return self.start <= t_ns < self.end


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def maxrss_mib() -> float:
    """Peak RSS of this process so far, in MiB.

    VmHWM of /proc/self/status where there is one: ru_maxrss would not do, as Linux carries
    the parent's peak over into a child that subprocess starts with vfork + exec.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def sleep_until(t_ns: int) -> None:
    """Sleep until perf_counter_ns() reaches ``t_ns``."""
    while (left := t_ns - time.perf_counter_ns()) > 0:
        time.sleep(left / 1e9)


class Probe:
    """A thread that samples process CPU time at both edges of the window.

    ``hook(at_start)`` runs right after each sample (e.g. to snapshot RocksDB's stats).
    """

    def __init__(self, win: Window, hook: Callable[[bool], None] | None = None) -> None:
        self.win = win
        self.hook = hook
        self.cpu = [0.0, 0.0]
        self._thread = threading.Thread(target=self._run, name="bench-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i, at in enumerate((self.win.start, self.win.end)):
            sleep_until(at)
            self.cpu[i] = _cpu_seconds()
            if self.hook is not None:
                self.hook(i == 0)

    def cpu_seconds(self) -> float:
        """User+sys CPU seconds of the whole process inside the window."""
        self._thread.join()
        return self.cpu[1] - self.cpu[0]


def percentile(sorted_ns: Sequence[int], q: float) -> float | None:
    """Nearest-rank percentile of sorted nanosecond samples, in microseconds."""
    if not sorted_ns:
        return None
    return sorted_ns[max(0, math.ceil(q * len(sorted_ns)) - 1)] / 1e3


def make_rep(
    spec: Spec,
    lat_ns: list[int],
    win: Window,
    probe: Probe,
    *,
    records: int | None = None,
    per_sync: float | None = None,
    threads: int | None = None,
) -> Rep:
    """Summarise one repetition; ``records`` defaults to one op of ``batch`` per sample."""
    lat_ns.sort()
    if records is None:
        records = len(lat_ns) * spec.batch
    seconds = win.seconds
    cpu = probe.cpu_seconds()
    return Rep(
        records=records,
        seconds=seconds,
        rate=records / seconds,
        mb_s=records * spec.size / seconds / 1e6,
        p50_us=percentile(lat_ns, 0.50),
        p99_us=percentile(lat_ns, 0.99),
        p999_us=percentile(lat_ns, 0.999),
        max_us=lat_ns[-1] / 1e3 if lat_ns else None,
        per_sync=per_sync,
        cpu_us=cpu * 1e6 / records if records else None,
        peak_rss_mib=0.0,  # filled in by the child's main, after the implementation returns
        rss_delta_mib=0.0,
        threads=threads,
        samples=len(lat_ns),
    )


def open_target(path: str, append: bool) -> tuple[int, int]:
    """Open a baseline's file; unless ``append``, zero-fill and sync a ring of RING_SIZE bytes.

    Returns (fd, ring size or 0 for append). Overwriting preallocated blocks, as walasync does
    inside its zero-filled segments, lets fdatasync skip the file-size metadata update.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    if append:
        return fd, 0
    zeros = bytes(1 << 20)
    for off in range(0, RING_SIZE, len(zeros)):
        os.pwrite(fd, zeros, off)
    os.fsync(fd)
    return fd, RING_SIZE


Op = Callable[[int], bool]
"""One durable op (``batch`` records); its argument is the thread's op counter. Returns False
when it gave up because the window had ended (such an op is not counted)."""


def run_threads(
    spec: Spec,
    make_op: Callable[[int, Window], Op],
    *,
    hook: Callable[[bool], None] | None = None,
    per_sync: Callable[[], float | None] | None = None,
    stragglers: list[threading.Thread] | None = None,
) -> Rep:
    """Drive ``spec.threads`` threads, each looping on its op until the window ends.

    ``make_op(thread_index, window)`` runs on the thread before the start signal (so per-thread
    resources such as a database connection are made there) and returns the op.

    With a ``stragglers`` list, threads whose last op is still running STRAGGLER_GRACE
    seconds after the window are not waited for but put there (their op could not count);
    the caller must then leave their resources alone, and the process should exit at once.
    """
    threads = spec.threads
    win = Window(0, 0)
    ready = threading.Barrier(threads + 1)
    go = threading.Event()
    lats: list[list[int]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def worker(index: int, lat: list[int]) -> None:
        try:
            op = make_op(index, win)
        except BaseException as exc:
            errors.append(exc)
            ready.abort()
            return
        ready.wait()
        go.wait()
        clock, start, end, k = time.perf_counter_ns, win.start, win.end, 0
        try:
            while (t0 := clock()) < end:
                if not op(k):
                    break
                k += 1
                t1 = clock()
                if start <= t1 < end:
                    lat.append(t1 - t0)
        except BaseException as exc:
            errors.append(exc)

    pool = [
        threading.Thread(target=worker, args=(i, lat), daemon=True) for i, lat in enumerate(lats)
    ]
    for t in pool:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    if not errors:
        w = Window.of(spec)
        win.start, win.end = w.start, w.end
    probe = Probe(win, hook) if not errors else None
    go.set()
    if stragglers is None:
        for t in pool:
            t.join()
    else:
        sleep_until(win.end)
        deadline = time.monotonic() + STRAGGLER_GRACE
        for t in pool:
            t.join(max(0.0, deadline - time.monotonic()))
        stragglers += [t for t in pool if t.is_alive()]
    if errors:
        raise errors[0]
    assert probe is not None
    # a straggler appends no more samples: its op ends after the window
    rep = make_rep(spec, [x for lat in lats for x in lat], win, probe, threads=threads)
    rep.per_sync = per_sync() if per_sync is not None else None
    return rep
