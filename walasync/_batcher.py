"""Group commit: every pending append goes out in one write plus one fdatasync.

Theory of operation. `put` queues a unit (one record, or the records of one
`append_many`) and hands back a future. One batch task takes everything pending (up to
`max_batch_bytes`, never splitting a unit), assigns the LSNs, and has the I/O thread write
the batch and fdatasync it; meanwhile the next batch accumulates. Once the I/O thread
reports back, the task resolves the batch's futures with their first LSNs, in order.

Invariants:
- One batch in flight, and LSNs assigned in queue order: LSNs are dense and the file holds
  batches in LSN order.
- A future is resolved only after its batch is durable (in `Durability.FSYNC`) and only if
  nobody cancelled it; a cancelled append whose unit was queued may still become durable.
- Queued bytes (plus bytes granted to appenders about to queue) stay under
  `max_pending_bytes`, except for one unit when the queue is empty: appenders beyond that
  wait in FIFO order, so memory is bounded whatever the number of appenders.
- The first failed write or fdatasync fails the log for good: that batch, everything
  pending and every later call raise `BrokenLogError`; fdatasync is never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable

from ._options import Durability, Options
from ._store import Store
from ._worker import Worker
from .errors import BrokenLogError, ClosedError, RecordTooLargeError, WrongLoopError

__all__ = ("Batcher",)

_RECORD_OVERHEAD = 4  # the record's entry in its batch's length table


class Batcher:
    """The pending queue, the batch task and the log's failure state."""

    def __init__(self, store: Store, worker: Worker, options: Options) -> None:
        self._loop = asyncio.get_running_loop()
        self._store = store
        self._worker = worker
        self._fsync = options.durability is Durability.FSYNC
        self._max_record = options.max_record_size
        self._max_batch = options.max_batch_bytes
        self._max_pending = options.max_pending_bytes
        self._delay = options.max_batch_delay
        # The pending queue: one entry per unit in the last three lists.
        self._records: list[bytes] = []
        self._futures: list[asyncio.Future[int]] = []
        self._counts: list[int] = []
        self._sizes: list[int] = []
        self._pending_bytes = 0
        self._pending_records = 0
        self._reserved = 0  # bytes granted to appenders that left the space queue
        self._space_waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self._sync_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wakeup: asyncio.Future[None] | None = None
        self.next_lsn = store.next_lsn  # LSN of the next batch
        self.acked_lsn = self.next_lsn - 1  # highest LSN acknowledged to an appender
        self.synced_lsn = self.acked_lsn  # highest LSN known fdatasync'd
        self.in_flight = 0  # records in the batch being written
        self.failure: BaseException | None = None
        self.closing = False
        self._task = self._loop.create_task(self._run(), name="walasync-batcher")
        self._ticker: asyncio.Task[None] | None = None
        if options.durability is Durability.INTERVAL:
            self._ticker = self._loop.create_task(
                self._sync_every(options.sync_interval), name="walasync-sync"
            )

    @property
    def pending(self) -> int:
        """Records queued and not yet taken into a batch."""
        return self._pending_records

    def put(self, records: bytes | list[bytes], count: int, nbytes: int) -> Awaitable[int]:
        """Queue a unit; the awaitable gives the LSN of its first record once acknowledged.

        Raises:
            RecordTooLargeError, ClosedError, BrokenLogError, WrongLoopError.
        """
        if self.failure is not None or self.closing or asyncio.get_running_loop() is not self._loop:
            self.check()
        if nbytes > self._max_record:
            raise RecordTooLargeError(
                f"{nbytes} bytes is over max_record_size ({self._max_record})"
            )
        size = nbytes + _RECORD_OVERHEAD * count
        used = self._pending_bytes + self._reserved
        if self._space_waiters or (used and used + size > self._max_pending):
            return self._put_when_room(records, count, size)
        return self._enqueue(records, count, size)

    def check(self) -> None:
        """Raise if the log cannot take appends now, or not from this event loop."""
        if self.failure is not None:
            raise self.broken()
        if self.closing:
            raise ClosedError("the log is closed")
        if asyncio.get_running_loop() is not self._loop:
            raise WrongLoopError("a Wal must be used from the event loop that opened it")

    def _enqueue(self, records: bytes | list[bytes], count: int, size: int) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = self._loop.create_future()
        if isinstance(records, bytes):
            self._records.append(records)
        else:
            self._records.extend(records)
        self._futures.append(fut)
        self._counts.append(count)
        self._sizes.append(size)
        self._pending_bytes += size
        self._pending_records += count
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set_result(None)
        return fut

    async def _put_when_room(self, records: bytes | list[bytes], count: int, size: int) -> int:
        granted: asyncio.Future[None] = self._loop.create_future()
        self._space_waiters.append((granted, size))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # granted, then cancelled
                self._reserved -= size
            self._grant_space()
            raise
        self._reserved -= size
        if self.failure is not None:
            raise self.broken()
        return await self._enqueue(records, count, size)

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
                return
            waiters.popleft()
            self._reserved += size
            granted.set_result(None)

    def _take(self) -> tuple[list[bytes], list[asyncio.Future[int]], list[int]]:
        """Remove the next batch's units from the queue."""
        if self._pending_bytes <= self._max_batch:
            records, futures, counts = self._records, self._futures, self._counts
            self._records, self._futures, self._counts, self._sizes = [], [], [], []
            self._pending_bytes = 0
            self._pending_records = 0
        else:
            total = units = nrecords = 0
            for size, count in zip(self._sizes, self._counts, strict=True):
                if units and total + size > self._max_batch:
                    break
                total += size
                units += 1
                nrecords += count
            records, self._records = self._records[:nrecords], self._records[nrecords:]
            futures, self._futures = self._futures[:units], self._futures[units:]
            counts, self._counts = self._counts[:units], self._counts[units:]
            del self._sizes[:units]
            self._pending_bytes -= total
            self._pending_records -= nrecords
        if self._space_waiters:
            self._grant_space()
        return records, futures, counts

    async def _run(self) -> None:
        """The batch task: take, write (and fdatasync), resolve; until closed and drained."""
        futures: list[asyncio.Future[int]] = []
        try:
            while True:
                if not self._futures:
                    if self.closing and not self._space_waiters and not self._reserved:
                        return
                    self._wakeup = self._loop.create_future()
                    await self._wakeup
                    continue
                if self._delay and self._pending_bytes < self._max_batch and not self.closing:
                    await asyncio.sleep(self._delay)
                records, futures, counts = self._take()
                first = self.next_lsn
                self.next_lsn = first + len(records)
                self.in_flight = len(records)
                await self._worker.run(self._store.write_batch, first, records, self._fsync)
                self.in_flight = 0
                self.acked_lsn = self.next_lsn - 1
                if self._fsync:
                    self.synced_lsn = self.acked_lsn
                lsn = first
                for fut, count in zip(futures, counts, strict=True):
                    if not fut.done():
                        fut.set_result(lsn)
                    lsn += count
                futures = []
                if self._sync_waiters:
                    self._wake_syncers()
        except BaseException as exc:
            self._fail(exc, futures)
            if not isinstance(exc, Exception):
                raise

    async def sync(self) -> None:
        """Wait until everything queued so far is acknowledged and fdatasync'd."""
        if self.failure is not None:
            raise self.broken()
        target = self.next_lsn - 1 + self._pending_records
        if self.acked_lsn < target:
            done: asyncio.Future[None] = self._loop.create_future()
            self._sync_waiters.append((target, done))
            await done
        if self.synced_lsn < target:
            acked = self.acked_lsn
            try:
                await self._worker.run(self._store.sync)
            except Exception as exc:
                self._fail(exc, [])
                raise self.broken() from exc
            self.synced_lsn = max(self.synced_lsn, acked)

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

    def broken(self) -> BrokenLogError:
        """A fresh error for one caller, chained to the failure that broke the log."""
        err = BrokenLogError(
            "the log failed and accepts no more appends; reopen it to recover every "
            f"acknowledged record (first failure: {self.failure!r})"
        )
        err.__cause__ = self.failure
        return err

    def _fail(self, exc: BaseException, batch: list[asyncio.Future[int]]) -> None:
        """Fail the log for good: this batch, everything queued and every waiter."""
        if self.failure is None:
            self.failure = exc
        waiting: list[asyncio.Future[int]] | list[asyncio.Future[None]]
        for waiting in (
            batch,
            self._futures,
            [g for g, _ in self._space_waiters],
            [d for _, d in self._sync_waiters],
        ):
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(self.broken())
        self._records, self._futures, self._counts, self._sizes = [], [], [], []
        self._pending_bytes = self._pending_records = 0
        self._space_waiters.clear()
        self._sync_waiters = []

    async def close(self) -> None:
        """Stop taking appends, write out everything queued, and fdatasync in INTERVAL mode."""
        self.closing = True
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set_result(None)
        await asyncio.wait([self._task])
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.wait([self._ticker])
            if self.failure is None:
                await self.sync()

    def __repr__(self) -> str:
        state = "broken" if self.failure else "closing" if self.closing else "open"
        return (
            f"<Batcher {state} pending={self._pending_records} in_flight={self.in_flight} "
            f"acked={self.acked_lsn} synced={self.synced_lsn}>"
        )
