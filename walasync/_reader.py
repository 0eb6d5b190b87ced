"""Streaming records back: seek to an LSN, then read chunks off the event loop.

A read works on a snapshot taken when it starts: the segments that exist and the highest
acknowledged LSN. Everything up to that LSN was fully written before it was acknowledged,
so a read never sees a half-written batch, even while appends go on, except the one batch
a truncate_back rewrites in place: a read that finds it invalid while a cut above its place
was under way reads it again once the cut is over. File reads run in the
loop's default executor; the loop only parses. Memory is one chunk (or one batch, if a
batch is larger) at a time. A cancelled read lets the file work it started end before it
raises: it closes every file it opened, and none while a read still uses it.

A follower reads in passes, each a plain read: it takes the durable watermark, then the
snapshot (which then holds every segment with a record up to the watermark), and reads up
to the watermark; between passes it waits, holding no file, until the writer wakes it.

A read-only store (a writer in another process) has no watermark and no `cutting`: its
reads stop at what the last look found, and read META after each chunk
(`_read_then_look`): a truncation there stops the read as one made while it ran.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from functools import partial
from typing import Any, NamedTuple, Protocol, TypeVar

from . import _format as fmt
from . import _segment as seg
from ._store import Store
from .errors import CorruptionError, TruncatedError, WalError, map_os_error

__all__ = (
    "Batch",
    "Record",
    "Watermark",
    "cut_ahead",
    "follow_batches",
    "follow_records",
    "read_batches",
    "read_records",
)

CHUNK = 1 << 20
FIRST_CHUNK = 64 << 10  # the first read after a seek: the first record comes sooner
_NONE_REMOVED = 1 << 64  # above every LSN
# How long a read that found the batch a cut rewrites waits for the cut to end (a read-only
# reader cannot tell a slow writer from one killed during the cut: then it raises).
CUT_WAIT = 10.0
T = TypeVar("T")


class Record(NamedTuple):
    """One record read back from the log."""

    lsn: int
    data: bytes


class Batch(NamedTuple):
    """Records read back together (`Wal.read_batches`): whole `append_many` units, except
    that the read's `start` or `end` may fall inside one.

    `joined` lists the positions `i` in `records` whose unit goes on with the next record
    (past the last one when `end` cut the unit); every other position ends a unit. Empty
    when every record is a unit of its own (plain `append`s), or when not asked for.
    """

    lsn: int  # of records[0]
    records: list[bytes]
    joined: tuple[int, ...] = ()


class Watermark(Protocol):
    """The writer's side as a follower sees it (the batcher is one)."""

    @property
    def synced_lsn(self) -> int:
        """Records up to this LSN are durable: a follower may read them."""
        ...

    def watch(self) -> asyncio.Future[None] | None:
        """A future set once `synced_lsn` moves on, or None if it never will (closed);
        raises `BrokenLogError` if the log failed."""
        ...

    def unwatch(self, fut: asyncio.Future[None]) -> None:
        """Forget a future from `watch` that nobody awaits any more."""
        ...

    def keep_recent(self, keep: bool) -> None:
        """A follower begins (True) or ends (False): keep the latest batches in memory for
        `recent` while any runs."""
        ...

    def recent(self, start: int, upto: int) -> list[Batch] | None:
        """Records `start`..`upto` (durable, at most `synced_lsn`) from memory, as batches,
        or None if the writer does not hold all of them."""
        ...


async def _finish(job: asyncio.Future[T]) -> T:
    """The result of an executor job. If the caller is cancelled meanwhile, the job (which
    cannot be stopped) is left to end first, so that the caller knows every file it opened
    and closes none under a read."""
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        while not job.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait((job,))
        raise


def _open_scan(store: Store, first_lsn: int, start: int) -> seg.Scan:
    """Open a segment and position a scan at the batch holding `start` (or just before:
    the caller skips records below `start`), through the segment's index where one is
    known, never by walking the segment from its start."""
    io = store.io
    epoch = store.cut_epoch  # before the seal is read: see `Store.keep_index`
    path = store.segment_path(first_lsn)
    fd = io.open_read(path)
    try:
        salt = seg.read_header(io, fd, path, first_lsn)
        scan = seg.Scan(io, fd, path, salt, fmt.SEGMENT_HEADER, first_lsn, store.max_record_size)
        if start > first_lsn:
            index = store.indexes.get(first_lsn)
            if index is None:
                seal = seg.read_seal(io, fd, salt)
                if seal is not None:
                    index = store.keep_index(first_lsn, seal.index, epoch)
            found = index.find(start) if index is not None else None
            if found is not None:
                scan.seek(*found)
            # The rest is at most INDEX_INTERVAL bytes of batches, or the whole segment if
            # it has no index (written in format 1, or its seal is damaged).
            scan.skip_to(start)
    except BaseException:
        io.close(fd)
        raise
    return scan


def read_records(
    store: Store, segments: tuple[int, ...], start: int, stop: int, ncuts: int | None = None
) -> AsyncGenerator[Record, None]:
    """Yield the records with LSNs in [start, stop] from `segments`, a snapshot of the
    store's segment list (a truncate_back committed after this call, even before the first
    record is asked for, counts as one made while the read ran; with `ncuts`, every one
    after the first `ncuts` of the store's `cuts`: a read-only reader's `stop` is what it
    saw with that many).

    Raises:
        TruncatedError: the records this read was at were truncated meanwhile.
        CorruptionError: a batch up to `stop` is invalid, or the LSNs have a gap.
        WalError: a read failed (the OSError is its cause).
    """
    if ncuts is None:
        ncuts = _cuts_before(store)
    return _records(_batches(store, segments, start, stop, ncuts=ncuts), store)


async def _records(
    reading: AsyncGenerator[Batch, None], store: Store
) -> AsyncGenerator[Record, None]:
    async with contextlib.aclosing(reading) as batches:
        async for lsn, records, _ in batches:
            meta, ncuts, removed = store.meta, len(store.cuts), _NONE_REMOVED
            for data in records:
                if store.meta is not meta:  # a truncation committed while we yielded
                    meta, removed = store.meta, _removed_from(store, lsn, ncuts)
                if lsn >= removed:
                    raise _cut_error(removed)
                yield Record(lsn, data)
                lsn += 1


def _cuts_before(store: Store) -> int:
    """How many truncate_back calls a read starting now has behind it: a cut committed but
    still under way counts as one made while the read runs (it removes as the read goes).

    One attribute read: the I/O thread commits a cut in two steps (`cuts`, then `cutting`),
    and a read computed from both between them took the cut for one made before it, then
    reported the blocks it was zeroing as corruption (kill -9 torture, CI)."""
    return store.cuts_done


def _removed_from(store: Store, lsn: int, ncuts: int) -> int:
    """The first LSN, `lsn` or after, that truncations removed since a batch was read (a
    huge number if none): checked, for records decoded already, once a truncation
    committed (the store's META changed), so a batch read before it never hands out a
    removed record. Raises `TruncatedError` if truncate_front removed `lsn`; the
    truncate_back calls before the batch was read (the first `ncuts`) are accounted for
    already (the batch stops before their cuts)."""
    first = store.meta.first_lsn
    if lsn < first:
        raise TruncatedError(
            f"records from {lsn} to {first - 1} were truncated while this read ran"
        )
    return min(store.cuts[ncuts:], default=_NONE_REMOVED)


def _cut_error(cut: int) -> TruncatedError:
    return TruncatedError(f"records from {cut} on were truncated while this read ran")


def read_batches(
    store: Store, segments: tuple[int, ...], start: int, stop: int, ncuts: int | None = None
) -> AsyncGenerator[Batch, None]:
    """As `read_records`, a batch at a time, saying where units end."""
    if ncuts is None:
        ncuts = _cuts_before(store)
    return _batches(store, segments, start, stop, units=True, ncuts=ncuts)


async def _batches(
    store: Store,
    segments: tuple[int, ...],
    start: int,
    stop: int,
    units: bool = False,
    ncuts: int | None = None,
) -> AsyncGenerator[Batch, None]:
    """Yield the records with LSNs in [start, stop] from `segments`, a batch (or the part
    of one in that range) at a time: the callers yield each record themselves, one
    generator deep. With `units`, each `Batch` says where its units end.

    Raises:
        CorruptionError: a batch up to `stop` is invalid, or the LSNs have a gap.
        WalError: a read failed (the OSError is its cause).
    """
    loop = asyncio.get_running_loop()
    cuts = store.cuts
    if ncuts is None:
        ncuts = len(cuts)  # truncate_back calls before this read began
    cut = stop + 1  # records from here on were removed by a truncate_back since

    async def truncated(exc: BaseException | None = None) -> WalError:
        """Why a read failed: a truncation that removed its records (first_lsn moves up
        before any file is deleted, so checking it after a read is enough), or `exc`. A
        read-only reader learns of truncations by another process from META."""
        nonlocal cut
        if store.readonly and exc is not None:
            with contextlib.suppress(Exception):
                await loop.run_in_executor(None, store.reload_meta)
        # A writer's cut is in `cuts` and `cutting` from its commit on, before it zeroes or
        # deletes anything: a read failing on what it removes is a truncated read.
        cut = min([cut, *cuts[ncuts:], *([store.cutting] if store.cutting else [])])
        if start < store.meta.first_lsn or start >= cut:
            what = (
                f"records from {start} to {store.meta.first_lsn - 1}"
                if start < store.meta.first_lsn
                else f"records from {cut} on"
            )
            err = TruncatedError(f"{what} were truncated while this read ran")
            err.__cause__ = exc
            err.__suppress_context__ = True
            return err
        assert isinstance(exc, WalError)
        return exc

    async def settle(job: asyncio.Future[T]) -> T:
        try:
            return await _finish(job)
        except WalError as exc:
            raise await truncated(exc)  # noqa: B904 - the cause is set
        except OSError as exc:
            raise await truncated(map_os_error(exc, f"reading {store.path}"))  # noqa: B904

    def run(fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        return settle(loop.run_in_executor(None, fn, *args))

    async def look() -> None:
        if store.readonly:
            await run(store.reload_meta)

    reread = ncuts  # the cuts a read of the same bytes again has accounted for

    async def rewritten() -> bool:
        """Whether the invalid batch just found may be the batch holding a cut made since
        (above `start`: else the read stops as truncated), which the cut rewrites in place
        with the records it keeps: a read that took its header before the rewrite and its
        body after finds it invalid (the kill -9 torture, in CI). If so, wait for the cut
        to be over (META shows none under way); then reading it again is reading what the
        cut kept. At most once per cut, so real damage still raises."""
        nonlocal reread
        await look()
        if len(cuts) == reread or min(cuts[reread:]) <= start:
            return False
        reread = len(cuts)
        deadline = loop.time() + CUT_WAIT
        while store.meta.cut and store.cut_failed is None and loop.time() < deadline:
            await asyncio.sleep(0.001)
            await look()
        return not store.meta.cut

    # A read-only reader learns of the writer's truncations from META only: it reads META
    # after each chunk (see `_read_then_look`).
    chunk = partial(_read_then_look, store) if store.readonly else seg.Scan.batches

    if start < store.meta.first_lsn:
        raise await truncated()
    index = store.locate(start, segments)
    start = max(start, segments[0]) if segments else start
    while index < len(segments) and start <= stop:
        first = segments[index]
        opening = loop.run_in_executor(None, _open_scan, store, first, start)
        try:
            scan = await settle(opening)
        except asyncio.CancelledError:  # the file was opened all the same
            if not opening.cancelled() and opening.exception() is None:
                await run(store.io.close, opening.result().fd)
            raise
        path = scan.path
        size = FIRST_CHUNK
        try:
            while start <= stop:
                batches = await run(chunk, scan, size)
                size = CHUNK
                for offset, head, payload in batches:
                    if start > stop:
                        break
                    if len(cuts) != ncuts:
                        cut = min([cut, *cuts[ncuts:]])
                        ncuts = len(cuts)
                    if start < store.meta.first_lsn or start >= cut:
                        raise await truncated()
                    try:
                        records = fmt.decode_records(head, payload)
                    except fmt.FormatError as exc:
                        raise await truncated(CorruptionError(path, offset, str(exc))) from None
                    lsn = head.first_lsn
                    skip = start - lsn
                    if skip > 0:
                        del records[:skip]
                        lsn = start
                    last = min(stop, head.first_lsn + head.nrecords - 1, cut - 1)
                    records = records[: last - lsn + 1]
                    if records:
                        joined: tuple[int, ...] = ()
                        if units:
                            skip, n = max(skip, 0), len(records)
                            joined = tuple(
                                i - skip
                                for i in fmt.joined_records(head, payload)
                                if skip <= i < skip + n
                            )
                        yield Batch(lsn, records, joined)
                    start = lsn + len(records)
                if scan.end is not None:
                    break
        finally:
            await run(store.io.close, scan.fd)
        if start > stop:
            return
        follows = segments[index + 1] if index + 1 < len(segments) else None
        # Invalid bytes after all of a segment's records are a torn seal: harmless.
        if follows != scan.next_lsn:
            if scan.end == "invalid" and await rewritten():
                continue  # the same segment again, from `start`
            what = (
                "an invalid batch"
                if scan.end == "invalid"
                else f"the end of the segment's data (the next segment starts at {follows})"
                if follows is not None
                else "the end of the log"
            )
            raise await truncated(
                CorruptionError(path, scan.offset, f"expected LSN {scan.next_lsn}, found {what}")
            )
        index += 1


def _read_then_look(
    store: Store, scan: seg.Scan, size: int
) -> list[tuple[int, fmt.BatchHeader, bytes]]:
    """(Read-only stores.) The next batches, then a look at META. The writer commits a
    truncation in META before it removes or rewrites anything, and its `cuts` count only
    grows: if META shows no new cut after the batches were read, they are of the history
    the read began in; if it shows one, the read stops at it (`_batches`). So a read never
    gives a record written after a cut following one written before it. One small file
    read per chunk of about 1 MiB (`CHUNK`)."""
    batches = scan.batches(size)
    store.reload_meta()
    return batches


async def follow_records(
    store: Store, watermark: Watermark, start: int, stop: int
) -> AsyncGenerator[Record, None]:
    """Yield the records with LSNs in [start, stop] as they become durable (see
    `follow_batches`), one at a time.

    A truncation that commits while a batch is being given out stops it: truncate_front
    past the next record, or a truncate_back below it, raises `TruncatedError`; a cut
    right at the next record removed nothing given, and following goes on from there."""
    while True:
        async with contextlib.aclosing(follow_batches(store, watermark, start, stop)) as batches:
            async for lsn, records, _ in batches:
                meta, ncuts, removed = store.meta, len(store.cuts), _NONE_REMOVED
                for data in records:
                    if store.meta is not meta:
                        meta, removed = store.meta, _removed_from(store, lsn, ncuts)
                    if lsn >= removed:
                        break
                    yield Record(lsn, data)
                    lsn += 1
                if lsn >= removed:
                    break
            else:
                return
        if removed < lsn:
            raise TruncatedError(
                f"records from {removed} on, some of them already yielded, were removed by "
                "truncate_back"
            )
        start = lsn  # the records after the cut come from the next pass


async def follow_batches(
    store: Store, watermark: Watermark, start: int, stop: int, units: bool = False
) -> AsyncGenerator[Batch, None]:
    """Yield the records with LSNs in [start, stop] as they become durable (up to
    `watermark.synced_lsn`), a batch at a time, waiting for more between passes; end once
    the log is closed and every record up to its last watermark was yielded.

    Raises:
        BrokenLogError: the log failed (raised once every durable record was yielded).
        CorruptionError, WalError: as `read_records`.
    """
    cuts, seen = store.cuts, store.cuts_done  # a cut under way: made while following
    watermark.keep_recent(True)
    try:
        while True:
            seen = cuts_since(cuts, seen, start)
            upto = min(stop, watermark.synced_lsn)
            # A cut under way (committed, in `cuts`, before the watermarks show it): what it
            # removes is not there to follow.
            for under_way in (*cuts[store.cuts_done :], store.cutting):
                if under_way:
                    upto = min(upto, under_way - 1)
            if start <= upto and start >= store.meta.first_lsn:
                recent = watermark.recent(start, upto)
                if recent is not None:  # just written: from the writer's memory
                    for batch in recent:
                        yield batch
                        start = batch.lsn + len(batch.records)
                        if len(cuts) != seen or store.cutting or start < store.meta.first_lsn:
                            break  # a truncation meanwhile: the checks above, or the file's
                    continue
            if start <= upto:
                # The watermark first: every segment with a record up to it is in the snapshot.
                segments = store.snapshot()
                try:
                    async with contextlib.aclosing(
                        _batches(store, segments, start, upto, units)
                    ) as batches:
                        async for batch in batches:
                            yield batch
                            # The caller asks for the next batch once it is done with this one.
                            start = batch.lsn + len(batch.records)
                except TruncatedError:
                    if not cut_ahead(store, seen, start):
                        raise
                    continue
                start = upto + 1
            elif start > stop or not await _moved(watermark):
                return
    finally:
        watermark.keep_recent(False)


def cut_ahead(store: Store, seen: int, start: int) -> bool:
    """Whether the truncation that stopped a follower's read is no loss to it: cuts made
    after the first `seen` of `store.cuts`, all at or after `start` (it gave every record
    below), and no truncate_front past it. The records that follow the cut come in its
    next pass."""
    since = store.cuts[seen:]
    return bool(since) and min(since) >= start and start >= store.meta.first_lsn


def cuts_since(cuts: list[int], seen: int, start: int) -> int:
    """Check the truncate_back cuts after the first `seen` of `cuts` against a follower
    that gave every record below `start`, and return how many cuts it has now seen.

    Raises:
        TruncatedError: a cut removed a record it gave.
    """
    if len(cuts) != seen:
        if min(cuts[seen:]) < start:
            raise TruncatedError(
                f"records from {min(cuts[seen:])} on, some of them already given, were "
                "removed by truncate_back"
            )
        seen = len(cuts)
    return seen


async def _moved(watermark: Watermark) -> bool:
    """Wait until the watermark moves: True once it has, False if it never will."""
    fut = watermark.watch()
    if fut is None:
        return False
    try:
        await fut
    finally:
        watermark.unwatch(fut)  # if cancelled, nothing stays registered
    return True
