"""Streaming records back: seek to an LSN, then read chunks off the event loop.

A read works on a snapshot taken when it starts: the segments that exist and the highest
acknowledged LSN. Everything up to that LSN was fully written before it was acknowledged,
so a read never sees a half-written batch, even while appends go on. File reads run in the
loop's default executor; the loop only parses. Memory is one chunk (or one batch, if a
batch is larger) at a time.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from . import _format as fmt
from . import _segment as seg
from ._io import FileIO
from .errors import CorruptionError, WalError

__all__ = ("Record", "read_records")

CHUNK = 1 << 20
T = TypeVar("T")


class Record(NamedTuple):
    """One record read back from the log."""

    lsn: int
    data: bytes


def _open_scan(io: FileIO, path: str, first_lsn: int, start: int) -> seg.Scan:
    fd = io.open_read(path)
    try:
        salt = seg.read_header(io, fd, path, first_lsn)
        scan = seg.Scan(io, fd, path, salt, fmt.SEGMENT_HEADER, first_lsn)
        if start > first_lsn:
            scan.skip_to(start)
    except BaseException:
        io.close(fd)
        raise
    return scan


async def read_records(
    io: FileIO, directory: str, segments: Sequence[int], start: int, stop: int
) -> AsyncIterator[Record]:
    """Yield the records with LSNs in [start, stop] from the segments listed.

    Raises:
        CorruptionError: a batch up to `stop` is invalid, or the LSNs have a gap.
        WalError: a read failed (the OSError is its cause).
    """
    loop = asyncio.get_running_loop()

    async def run(fn: Callable[..., T], *args: Any) -> T:
        try:
            return await loop.run_in_executor(None, fn, *args)
        except WalError:
            raise
        except OSError as exc:  # the boundary for reads: OSError becomes WalError
            raise WalError(f"reading {directory}: {exc}") from exc

    index = max(bisect_right(segments, start) - 1, 0)
    start = max(start, segments[0]) if segments else start
    while index < len(segments) and start <= stop:
        first = segments[index]
        path = os.path.join(directory, seg.segment_name(first))
        scan = await run(_open_scan, io, path, first, start)
        try:
            while start <= stop:
                batches = await run(scan.batches, CHUNK)
                for offset, head, payload in batches:
                    if start > stop:
                        break
                    try:
                        records = fmt.decode_records(head, payload)
                    except fmt.FormatError as exc:
                        raise CorruptionError(path, offset, str(exc)) from None
                    lsn = head.first_lsn
                    skip = start - lsn
                    if skip > 0:
                        del records[:skip]
                        lsn = start
                    last = min(stop, head.first_lsn + head.nrecords - 1)
                    for data in records[: last - lsn + 1]:
                        yield Record(lsn, data)
                        lsn += 1
                    start = lsn
                if scan.end is not None:
                    break
        finally:
            await run(io.close, scan.fd)
        if start > stop:
            return
        index += 1
        follows = segments[index] if index < len(segments) else None
        if scan.end == "invalid" or follows != scan.next_lsn:
            what = (
                "an invalid batch"
                if scan.end == "invalid"
                else f"the end of the segment's data (the next segment starts at {follows})"
                if follows is not None
                else "the end of the log"
            )
            raise CorruptionError(path, scan.offset, f"expected LSN {scan.next_lsn}, found {what}")
