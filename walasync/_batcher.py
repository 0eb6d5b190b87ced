"""Group commit: every pending append goes out in one write plus one fdatasync.

Theory of operation. `put` queues a unit (one record, or the records of one
`append_many`) and hands back a future. Unless a send is already scheduled or two batches
are in flight, a send is scheduled with `call_soon`, so the appenders already due to run
join the batch. The send takes the queue (up to `max_batch_bytes`, never splitting a unit),
assigns the LSNs and hands the batch to the I/O thread, which writes batches one at a time,
each made durable before the next is written. When the I/O thread reports a batch back (a
callback on the loop: no task, no extra wake-up), its futures are resolved with their LSNs,
in order, 128 per loop pass: the appenders of the first chunk append again and their
records go out as the next batch while the loop still runs the rest, so the disk and the
loop work at the same time instead of taking turns.

Invariants:
- LSNs are assigned in queue order and batches are written in LSN order, one at a time:
  LSNs are dense, and a batch's write starts only after the one before it is durable.
  A batch that is not written (`NotWritten`) fails the batch queued behind it too, and
  their LSNs are reused; after any other failure the store writes nothing more.
- A future is resolved only after its batch is durable (in `Durability.FSYNC`) and only if
  nobody cancelled it; a cancelled append whose unit was queued may still become durable.
- Queued bytes (plus bytes granted to appenders about to queue) stay under
  `max_pending_bytes`, except for one unit when the queue is empty: appenders beyond that
  wait in FIFO order, so memory is bounded whatever the number of appenders.
- The first failed write or fdatasync fails the log for good: that batch, everything
  pending and every later call raise `BrokenLogError`; fdatasync is never retried.
- `synced_lsn` is the durable watermark: records up to it are fdatasync'd (in
  `Durability.FSYNC` it moves with each acknowledged batch, otherwise with each sync).
  Followers waiting for it to move are woken all at once when it does, when the log
  breaks, and when `close()` ends; with none waiting, a batch costs one truth test more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from itertools import islice
from threading import get_ident as _get_ident
from time import perf_counter as _clock

from ._appender import Appender, NotWritten
from ._opener import require_loop
from ._options import Durability, Options
from ._reader import Batch
from ._stats import RECORD_BOUNDS, SECOND_BOUNDS, Buckets
from ._store import LastSegment, Store
from ._worker import Worker
from .errors import (
    BrokenLogError,
    ClosedError,
    RecordTooLargeError,
    WalError,
    map_os_error,
)

__all__ = ("Batcher",)

_log = logging.getLogger("walasync")

_RECORD_OVERHEAD = 4  # the record's entry in its batch's length table
_PIPELINE = 2  # batches in flight at most: one being written, the next one queued behind it
_CHUNK = 128  # acknowledged appenders woken per loop pass (see `_resolve`)
_RECENT_BYTES = 8 << 20  # record bytes of the latest batches kept for followers (see `recent`)


def _not_written(exc: NotWritten) -> WalError:
    """The error for the appenders of a batch that was not written at all."""
    cause = exc.cause
    if isinstance(cause, OSError):
        return map_os_error(
            cause,
            "starting a new segment (nothing of this append was written; the log takes "
            "appends again once the cause is gone)",
        )
    err = WalError(f"could not start a new segment ({cause!r}); nothing was written")
    err.__cause__ = cause
    return err


class Batcher:
    """The pending queue, the batches in flight and the log's failure state."""

    def __init__(
        self,
        store: Store,
        last: LastSegment,
        worker: Worker,
        options: Options,
        on_rotate: Callable[[], object] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._owner_thread = _get_ident()
        self.appender = Appender(
            store,
            last,
            options.segment_size,
            fsync=options.durability is not Durability.NONE,
            pressed=lambda: len(self._flight) > 1,  # read on the I/O thread
            slow_sync=options.slow_sync_warning,
        )
        self._worker = worker
        self._on_rotate = on_rotate  # called on the loop after a batch started a segment
        self._rotations = 0
        self._fsync = options.durability is Durability.FSYNC
        self._max_record = options.max_record_size
        self._max_batch = options.max_batch_bytes
        self._max_pending = options.max_pending_bytes
        self._delay = options.max_batch_delay
        # The pending queue, two parallel lists: a unit's future stands at its first record,
        # with None at the unit's other records.
        self._records: list[bytes] = []
        self._futures: list[asyncio.Future[int] | None] = []
        self._pending_bytes = 0  # record bytes plus their length-table entries
        self._units = False  # the queue may hold a unit of several records
        # Records at the head of the queue that may still be sent while a truncate_back
        # waits (those queued before it); None when no cut waits.
        self._fence: int | None = None
        self._reserved = 0  # bytes granted to appenders that left the space queue
        self._space_waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self._sync_waiters: list[tuple[int, asyncio.Future[None]]] = []
        # Batches handed to the I/O thread and not yet reported back, oldest first: first
        # LSN, futures, then for the stats: appends, record bytes, when its oldest record was
        # queued and when it was taken; then, while followers run, the batch for `recent`.
        self._flight: deque[
            tuple[int, list[asyncio.Future[int] | None], int, int, float, float, Batch | None]
        ] = deque()
        # The latest batches written, oldest first, with no gap, while followers run: they
        # read what was just written from here instead of from the file (see `recent`).
        self._recent: deque[Batch] = deque()
        self._recent_bytes = 0
        self._followers = 0
        self._timer: asyncio.Handle | None = None  # the next batch, scheduled
        self._idle = True  # no send scheduled, and the pipeline has room for one
        self._drained: asyncio.Future[None] | None = None  # set once closed and drained
        self.next_lsn = last.next_lsn  # LSN of the next batch
        self.acked_lsn = self.next_lsn - 1  # highest LSN acknowledged to an appender
        self.synced_lsn = self.acked_lsn  # highest LSN known fdatasync'd
        self.in_flight = 0  # records in the batches being written
        self.failure: BaseException | None = None
        self.closing = False
        self.finished = False  # close() has ended: `synced_lsn` moves no more
        # Futures of followers waiting for `synced_lsn` to move (see `watch`).
        self._watchers: set[asyncio.Future[None]] = set()
        self._limit = 0  # what `put` may fill the queue to without a check (see `_set_limit`)
        self._since = 0.0  # when the oldest queued record was queued (a lower bound)
        # Statistics (see `_stats.py`), kept per batch on the loop; read from any thread.
        self.appends = self.records = self.appended_bytes = self.batches = 0
        self.batch_records = Buckets(RECORD_BOUNDS)
        self.append_seconds = Buckets(SECOND_BOUNDS)
        self._ticker: asyncio.Task[None] | None = None
        if options.durability is Durability.INTERVAL:
            self._ticker = self._loop.create_task(
                self._sync_every(options.sync_interval), name="walasync-sync"
            )

    @property
    def pending(self) -> int:
        """Records queued and not yet taken into a batch."""
        return len(self._records)

    @property
    def pending_bytes(self) -> int:
        """Queued bytes, as counted against `max_pending_bytes`."""
        return self._pending_bytes

    @property
    def waiting(self) -> int:
        """Appenders waiting for room in the queue."""
        return len(self._space_waiters)

    def put(self, data: bytes) -> Awaitable[int]:
        """Queue one record; the awaitable gives its LSN once acknowledged.

        Raises:
            RecordTooLargeError, ClosedError, BrokenLogError, WrongLoopError.
        """
        # The loop running on the loop's own thread is the loop: two cheap calls instead of
        # `asyncio.get_running_loop()`, which makes a getpid() system call each time.
        if _get_ident() != self._owner_thread or not self._loop.is_running():
            self.check()
        size = len(data)
        if size > self._max_record:
            raise self._too_large(size)
        size += _RECORD_OVERHEAD
        pending = self._pending_bytes + size
        if pending > self._limit:  # full, appenders waiting, refusing appends, or empty
            if self._limit or pending + self._reserved > self._max_pending:
                self.check()
                if self._must_wait(size):
                    return self._put_when_room(data, size)
                return self._enqueue(data, size)
            # The first record of a batch, in an open log: its wait starts now.
            self._since = _clock()
            self._limit = self._max_pending - self._reserved  # as `_set_limit` would
        # `_enqueue` for one record, inlined: this is the hot path.
        fut = self._loop.create_future()
        self._records.append(data)
        self._futures.append(fut)
        self._pending_bytes = pending
        if self._idle:
            self._start()
        return fut

    def put_many(self, records: list[bytes]) -> Awaitable[int]:
        """Queue records as one unit (never split across batches); the awaitable gives the LSN
        of the first once all are acknowledged."""
        self.check()
        nbytes = sum(map(len, records))
        if nbytes > self._max_record:
            raise self._too_large(nbytes)
        size = nbytes + _RECORD_OVERHEAD * len(records)
        if self._must_wait(size):
            return self._put_when_room(records, size)
        return self._enqueue(records, size)

    def _must_wait(self, size: int) -> bool:
        """Whether a unit of `size` bytes must wait for room (an empty queue takes any unit)."""
        used = self._pending_bytes + self._reserved
        return (used + size > self._max_pending and used > 0) or bool(self._space_waiters)

    def _too_large(self, nbytes: int) -> RecordTooLargeError:
        return RecordTooLargeError(f"{nbytes} bytes is over max_record_size ({self._max_record})")

    def check(self) -> None:
        """Raise if the log cannot take appends now, or not from this event loop."""
        self.check_loop()
        if self.failure is not None:
            raise self.broken()
        if self.closing:
            raise ClosedError("the log is closed")

    def check_loop(self) -> None:
        """Raise `WrongLoopError` unless called from the event loop that opened the log."""
        require_loop(self._loop)

    def _enqueue(self, records: bytes | list[bytes], size: int) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = self._loop.create_future()
        first = not self._records
        if first:  # the oldest record of the next batch: its wait starts now
            self._since = _clock()
        if isinstance(records, bytes):
            self._records.append(records)
            self._futures.append(fut)
        else:
            self._records += records
            self._futures.append(fut)
            self._futures += [None] * (len(records) - 1)
            self._units = len(records) > 1 or self._units
        self._pending_bytes += size
        if first:
            self._set_limit()
        if self._idle:
            self._start()
        return fut

    async def _put_when_room(self, records: bytes | list[bytes], size: int) -> int:
        """Wait in line (FIFO) until the queue has room for `size` bytes, then queue."""
        granted: asyncio.Future[None] = self._loop.create_future()
        self._space_waiters.append((granted, size))
        self._set_limit()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # granted, then cancelled
                self._reserved -= size
            self._grant_space()
            raise
        self._reserved -= size
        self._set_limit()
        if self.failure is not None:
            raise self.broken()
        return await self._enqueue(records, size)

    def _grant_space(self) -> None:
        """Let waiting appenders in, first come first served, while there is room."""
        waiters = self._space_waiters
        while waiters:
            granted, size = waiters[0]
            if granted.done():  # cancelled while waiting
                waiters.popleft()
                continue
            used = self._pending_bytes + self._reserved
            if used and used + size > self._max_pending:
                break
            waiters.popleft()
            self._reserved += size
            granted.set_result(None)
        self._set_limit()

    def _set_limit(self) -> None:
        """Keep `_limit` true: the fast path of `put` checks nothing else. It is 0 while
        the queue is empty, so that the first record of each batch takes the slow path,
        which notes when it was queued (for the append latency; no clock read per append)."""
        if self.failure is not None or self.closing or self._space_waiters:
            self._limit = -1
        elif not self._records:
            self._limit = 0
        else:
            self._limit = self._max_pending - self._reserved

    def _take(self) -> tuple[list[bytes], list[asyncio.Future[int] | None], int]:
        """Remove the next batch from the queue: everything, or as many whole units as fit
        in `max_batch_bytes` (at least one). Also gives its size as counted in the queue."""
        records, futures = self._records, self._futures
        fence = self._fence
        limit = len(records) if fence is None else fence
        if self._pending_bytes <= self._max_batch and limit == len(records):
            total = self._pending_bytes
            self._records, self._futures = [], []
            self._pending_bytes = 0
            self._units = False
        else:
            total = cut = 0
            while cut < limit:
                end = cut + 1
                while end < len(futures) and futures[end] is None:
                    end += 1
                size = sum(map(len, records[cut:end])) + _RECORD_OVERHEAD * (end - cut)
                if cut and total + size > self._max_batch:
                    break
                total += size
                cut = end
            records, self._records = records[:cut], records[cut:]
            futures, self._futures = futures[:cut], futures[cut:]
            self._pending_bytes -= total
        if fence is not None:
            self._fence = fence - len(records)
        if self._space_waiters:
            self._grant_space()
        elif not self._records and self._limit > 0:
            self._limit = 0  # as `_set_limit` would
        return records, futures, total

    def _start(self) -> None:
        """Send the next batch soon, or after `max_batch_delay` if one is set."""
        self._idle = False
        if self._delay and self._pending_bytes < self._max_batch and not self.closing:
            self._timer = self._loop.call_later(self._delay, self._send)
        else:
            # After the callbacks already due: the appenders that the last batch woke up
            # append again first, and all go out together.
            self._timer = self._loop.call_soon(self._send)

    def _send(self) -> None:
        self._timer = None
        if self.failure is not None or not self._records or self._fence == 0:
            self._idle = len(self._flight) < _PIPELINE
            return
        units, since = self._units, self._since
        records, futures, size = self._take()
        taken = _clock()
        appends = len(futures) - futures.count(None) if units else len(futures)
        # The records that share a unit with the next one: written down, so that a cut
        # (truncate_back) never splits a unit, even after a restart.
        joined = [i for i in range(len(futures) - 1) if futures[i + 1] is None] if units else ()
        first = self.next_lsn
        self.next_lsn = first + len(records)
        self.in_flight += len(records)
        nbytes = size - _RECORD_OVERHEAD * len(records)
        kept = Batch(first, records, tuple(joined)) if self._followers else None
        self._flight.append((first, futures, appends, nbytes, since, taken, kept))
        self._idle = len(self._flight) < _PIPELINE
        self._worker.submit(
            self._loop, self.appender.write_batch, (first, records, self._fsync, joined), self._sent
        )

    def _sent(self, _: object, exc: BaseException | None) -> None:
        """On the loop, once the I/O thread has written (and made durable) the oldest batch
        in flight."""
        first, futures, appends, nbytes, since, taken, kept = self._flight.popleft()
        self.in_flight -= len(futures)
        if exc is None and self.failure is not None:  # the log broke while this was in flight
            exc = self.failure
        if isinstance(exc, NotWritten) and self.failure is None:
            # Nothing was written, nor will the batches behind it be (the store refuses a
            # gap): their LSNs are free again, and later records and sync targets move down.
            self.next_lsn -= len(futures)
            for fut in futures:
                if fut is not None and not fut.done():
                    fut.set_exception(_not_written(exc))
            self._sync_waiters = [
                (t - len(futures) if t >= first else t, d) for t, d in self._sync_waiters
            ]
            self._wake_syncers()
        elif exc is not None:
            self._fail(exc, futures)
        else:
            self.acked_lsn = first + len(futures) - 1
            if self._fsync:
                self.synced_lsn = self.acked_lsn
            self.appends += appends
            self.records += len(futures)
            self.appended_bytes += nbytes
            self.batches += 1
            self.batch_records.add(len(futures))
            if kept is not None and self._followers:
                self._keep(kept, nbytes)
            if self._on_rotate is not None and self.appender.rotations != self._rotations:
                self._rotations = self.appender.rotations
                self._on_rotate()
            self._resolve(futures, first, 0, since, taken)
            if self._watchers and self._fsync:  # after the first appenders: they send next
                self._wake_watchers()
            if self._sync_waiters:
                self._wake_syncers()
        if self._timer is None:
            if self._records and self.failure is None:
                self._start()
            else:
                self._idle = True
        self._check_drained()

    def _resolve(
        self,
        futures: list[asyncio.Future[int] | None],
        first: int,
        start: int,
        since: float,
        taken: float,
    ) -> None:
        """Give acknowledged appenders their LSNs, `_CHUNK` appenders per loop pass.

        The appenders of one chunk run (and append again) before the next chunk is resolved,
        and their records go out as a batch of their own: the loop's work on the rest then
        overlaps that batch's write and fdatasync instead of waiting for it.
        """
        now = _clock()
        lsn = first + start
        woken = 0
        rest = False
        for fut in islice(futures, start, None):
            if fut is not None:
                if woken == _CHUNK:
                    rest = True
                    break
                woken += 1
                try:
                    fut.set_result(lsn)
                except asyncio.InvalidStateError:  # its appender was cancelled
                    pass
            lsn += 1
        call_soon = self._loop.call_soon
        call_soon(self._woken, woken, since, taken, now)  # after the appenders just woken
        if rest:
            call_soon(self._resolve, futures, first, lsn - first, since, taken)

    def _woken(self, n: int, since: float, taken: float, resolved: float) -> None:
        """Count the latency of `n` appenders woken at `resolved`, who have all resumed now.

        Counted per chunk, not per append: their records were queued one after the other
        from `since` (the batch's oldest) to `taken` (when the batch was taken), and they
        resumed in the same order from `resolved` to now; so the first waited
        `resolved - since`, the last `now - taken`, and the others are counted as spread
        evenly between the two.
        """
        now = _clock()
        low, high = resolved - since, now - taken
        if low > high:
            low, high = high, low
        self.append_seconds.spread(low, high, n)

    def _check_drained(self) -> None:
        if (
            self._drained is not None
            and not self._flight
            and (
                self.failure is not None
                or not (self._futures or self._space_waiters or self._reserved)
            )
            and not self._drained.done()
        ):
            self._drained.set_result(None)

    async def sync(self) -> None:
        """Wait until everything queued so far is acknowledged and fdatasync'd."""
        if self.failure is not None:
            raise self.broken()
        target = self.next_lsn - 1 + len(self._records)
        if self.acked_lsn < target:
            done: asyncio.Future[None] = self._loop.create_future()
            self._sync_waiters.append((target, done))
            await done
        if self.synced_lsn < target:
            acked, cuts = self.acked_lsn, len(self.appender.store.cuts)
            try:
                await self._worker.run(self.appender.sync)
            except Exception as exc:
                self._fail(exc, [])
                raise self.broken() from exc
            # A truncate_back meanwhile made `acked` stale (records above its cut may be
            # new and unsynced); the cut synced what it kept itself.
            if acked > self.synced_lsn and len(self.appender.store.cuts) == cuts:
                self.synced_lsn = acked
                if self._watchers:
                    self._wake_watchers()

    async def truncate_back(self, lsn: int, first_lsn: int) -> None:
        """Write out what was queued before the call, hold what comes after, then cut
        after `lsn`; the held records follow the cut (their LSNs start at `lsn + 1`).

        Raises:
            ValueError: `lsn` is outside `first_lsn - 1 .. last_lsn`, or inside a unit.
            BrokenLogError: a write failed, or the cut did (reopen to finish it).
        """
        self._fence = len(self._records)
        try:
            target = self.next_lsn - 1 + len(self._records)
            if self.acked_lsn < target:
                done: asyncio.Future[None] = self._loop.create_future()
                self._sync_waiters.append((target, done))
                await done
            self.check()
            if not first_lsn - 1 <= lsn <= self.acked_lsn:
                raise ValueError(
                    f"truncate_back({lsn}): lsn must be in {first_lsn - 1}..{self.acked_lsn}"
                )
            try:
                await self._worker.run(self.appender.truncate_back, lsn)
            except ValueError:
                raise
            except Exception as exc:
                self._fail(exc, [])
                raise self.broken() from exc
            removed = self.next_lsn - (lsn + 1)  # nothing is in flight
            self.next_lsn = lsn + 1
            self.acked_lsn = lsn
            if removed:  # the cut made what it kept durable first (a no-op cut did not)
                self.synced_lsn = lsn
                self._forget_recent()  # held records the cut removed; later ones reuse LSNs
            store = self.appender.store
            store.cuts_done = len(store.cuts)  # one step: reads from now on start after it
            store.cutting = 0  # the watermarks show the cut from here on
            self._sync_waiters = [(t - removed, d) for t, d in self._sync_waiters]
            self._wake_syncers()
            if self._watchers:  # records became durable, or followers' records went
                self._wake_watchers()
        finally:
            self._fence = None
            if self._records and self._idle and self.failure is None:
                self._start()

    def _wake_syncers(self) -> None:
        still = []
        for target, done in self._sync_waiters:
            if target <= self.acked_lsn:
                if not done.done():
                    done.set_result(None)
            else:
                still.append((target, done))
        self._sync_waiters = still

    async def _sync_every(self, interval: float) -> None:
        while self.failure is None:
            await asyncio.sleep(interval)
            if self.synced_lsn < self.acked_lsn and self.failure is None:
                with contextlib.suppress(BrokenLogError):
                    await self.sync()

    def watch(self) -> asyncio.Future[None] | None:
        """A future set (to None) once `synced_lsn` moves on from its value now, the log
        breaks, or `close()` ends; None if `synced_lsn` will never move again (closed).

        A follower awaits it only when it has read everything up to `synced_lsn`, so every
        wake-up is one pass of reading: at most one per follower per batch.

        Raises:
            BrokenLogError: the log failed; `synced_lsn` will never move again.
        """
        if self.failure is not None:
            raise self.broken()
        if self.finished:
            return None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._watchers.add(fut)
        return fut

    def unwatch(self, fut: asyncio.Future[None]) -> None:
        """Forget a watcher (its follower stopped waiting: it was cancelled, say)."""
        self._watchers.discard(fut)

    def keep_recent(self, keep: bool) -> None:
        """One more follower (True) wants the latest batches kept in memory, or one fewer
        (False); with none left, they are let go."""
        self._followers += 1 if keep else -1
        if not self._followers:
            self._forget_recent()

    def recent(self, start: int, upto: int) -> list[Batch] | None:
        """The records `start`..`upto` as batches kept in memory (new lists of the same
        records), or None unless every one of them is kept.

        A follower at the tail reads what was just written from here: no file read, no
        executor hop, no checksum and decoding of data this process wrote itself. Only
        written batches are kept, and the caller asks for no more than `synced_lsn`.
        """
        held = self._recent
        if not held or held[0].lsn > start:
            return None
        last = held[-1]
        if last.lsn + len(last.records) <= upto:
            return None
        i = len(held) - 1
        while held[i].lsn > start:  # followers read near the newest end
            i -= 1
        out = []
        for k in range(i, len(held)):  # by index: islice would walk the deque from its start
            lsn, records, joined = held[k]
            if lsn > upto:
                break
            lo, hi = max(start - lsn, 0), min(upto - lsn + 1, len(records))
            if joined:
                joined = tuple(j - lo for j in joined if lo <= j < hi)
            out.append(Batch(lsn + lo, records[lo:hi], joined))  # a list of its own
        return out

    def _keep(self, batch: Batch, nbytes: int) -> None:
        held = self._recent
        if held and held[-1].lsn + len(held[-1].records) != batch.lsn:
            self._forget_recent()  # no gap may hide in the middle
        held.append(batch)
        self._recent_bytes += nbytes
        while self._recent_bytes > _RECENT_BYTES and len(held) > 1:
            old = held.popleft()
            self._recent_bytes -= sum(map(len, old.records))

    def _forget_recent(self) -> None:
        self._recent.clear()
        self._recent_bytes = 0

    def _wake_watchers(self) -> None:
        watchers, self._watchers = self._watchers, set()
        for fut in watchers:
            if not fut.done():  # done: cancelled, its follower not yet resumed to unwatch
                fut.set_result(None)

    def broken(self) -> BrokenLogError:
        """A fresh error for one caller, chained to the failure that broke the log."""
        err = BrokenLogError(
            "the log failed and accepts no more appends; reopen it to recover every "
            f"acknowledged record (first failure: {self.failure!r})"
        )
        err.__cause__ = self.failure
        return err

    def _fail(
        self, exc: BaseException, batch: list[asyncio.Future[int] | None], log: bool = True
    ) -> None:
        """Fail the log for good: this batch, everything queued and every waiter."""
        if self.failure is None:
            self.failure = exc
            if log:
                _log.error(
                    "%s: the log is broken and refuses appends from now on (reopen it to "
                    "recover every acknowledged record): %r",
                    self.appender.store.path,
                    exc,
                    exc_info=exc,
                )
        waiting: list[asyncio.Future[int] | None] | list[asyncio.Future[None]]
        for waiting in (
            batch,
            self._futures,
            [g for g, _ in self._space_waiters],
            [d for _, d in self._sync_waiters],
        ):
            for fut in waiting:
                if fut is not None and not fut.done():
                    fut.set_exception(self.broken())
        self._records, self._futures = [], []
        self._pending_bytes = 0
        self._space_waiters.clear()
        self._sync_waiters = []
        self._wake_watchers()  # they see the failure in `watch`
        self._set_limit()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._idle = True
        self._check_drained()

    def refuse(self) -> None:
        """Take no more appends (ClosedError from now on); what is queued still goes out."""
        self.closing = True
        self._set_limit()

    async def close(self) -> None:
        """Stop taking appends, write out everything queued, and fdatasync in INTERVAL mode."""
        self.refuse()
        self._drained = self._loop.create_future()
        if self._timer is not None:  # no more waiting for company
            self._timer.cancel()
            self._send()
        try:
            self._check_drained()
            await self._drained
            if self._ticker is not None:
                self._ticker.cancel()
                await asyncio.wait([self._ticker])
                if self.failure is None:
                    await self.sync()
        finally:
            self.finished = True
            self._wake_watchers()  # followers end once they have read up to `synced_lsn`

    def abandon(self) -> None:
        """Stop a log nobody closed (from `Wal.__del__`, on any thread): no more appends,
        no background sync."""
        if not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._abandon)

    def _abandon(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self._fail(ClosedError("the log was garbage-collected without close()"), [], log=False)

    def __repr__(self) -> str:
        state = "broken" if self.failure else "closing" if self.closing else "open"
        return (
            f"<Batcher {state} pending={len(self._records)} in_flight={self.in_flight} "
            f"acked={self.acked_lsn} synced={self.synced_lsn} watchers={len(self._watchers)}>"
        )
