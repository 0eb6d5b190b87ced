"""One segment file: its name, its header, walking its batches, and repairing its tail.

Everything here blocks and runs on a worker thread. The rules for the end of a segment:
a valid batch is one whose header, LSN and checksum are right; the data of a segment ends
at end of file, at an all-zero header (the preallocated remainder), or at the first invalid
batch. Only the last segment can end in a torn write, because everything before its last
batch was fdatasync'd before the next batch was written. So an invalid stretch at the end
of the last segment, followed only by zeros, is a torn tail and is zeroed out; one with a
valid later batch after it is corruption and raises, as does any invalid batch in a sealed
segment (found when it is read).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from array import array
from bisect import bisect_right
from dataclasses import dataclass

from . import _compress
from . import _format as fmt
from ._io import FileIO
from .errors import CorruptionError, UnsupportedFormatError

__all__ = (
    "RECYCLE_NAME",
    "SPARE_NAME",
    "Index",
    "Scan",
    "Tail",
    "install",
    "parse_name",
    "read_header",
    "repair_tail",
    "reset_header",
    "scan_tail",
    "segment_name",
    "zero_after",
)

SPARE_NAME = "spare.tmp"
RECYCLE_NAME = "recycle.tmp"  # a segment truncation freed, waiting to become the spare
_NAME = re.compile(r"([0-9]{20})\.wal")
_salts = random.Random()
_CHUNK = 1 << 20
_SKIP_CHUNK = 64 << 10
_ZEROS = bytes(_CHUNK)
_BATCH_MAGICS = (fmt.BATCH_MAGIC.to_bytes(4, "little"), fmt.ZSTD_MAGIC.to_bytes(4, "little"))


def segment_name(first_lsn: int) -> str:
    """File name of the segment whose first record has LSN `first_lsn` (sorts by LSN)."""
    return f"{first_lsn:020d}.wal"


def parse_name(name: str) -> int | None:
    """The first LSN a segment file name stands for, or None if it is not a segment's name."""
    m = _NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def read_header(io: FileIO, fd: int, path: str, expected: int) -> int:
    """Check a segment's header against the LSN its name promises; return its salt."""
    return read_full_header(io, fd, path, expected).salt


def read_full_header(io: FileIO, fd: int, path: str, expected: int) -> fmt.SegmentHeader:
    """Check a segment's header against the LSN its name promises, and return it.

    Raises:
        CorruptionError: the header is missing, damaged or disagrees with the name.
        UnsupportedFormatError: the segment is of a format version this code cannot read.
    """
    buf = io.pread(fd, fmt.SEGMENT_HEADER, 0)
    try:
        head = fmt.decode_segment_header(buf)
    except fmt.FormatError as exc:
        raise CorruptionError(path, 0, str(exc)) from None
    except ValueError as exc:
        versions = ", ".join(map(str, fmt.READABLE_VERSIONS))
        raise UnsupportedFormatError(
            path, 0, f"format version {exc.args[0]}; this walasync reads versions {versions}"
        ) from None
    if head.first_lsn != expected:
        raise CorruptionError(
            path, 0, f"header says first LSN {head.first_lsn}, name says {expected}"
        )
    return head


class Scan:
    """Walks the valid batches of one open segment, in order, from a given offset.

    After a call, `offset` is where the next batch would start, `next_lsn` the LSN it
    must carry, and `end` says why walking stopped: None (more may follow), "eof", "zeros",
    "sealed" (a valid seal frame is at `offset`; its index is in `index`) or "invalid"
    (the bytes at `offset` are not the batch that must come next).

    With `expand` (the largest record the caller accepts), compressed batches come back
    decompressed, as if written plain (for those who decode records); without it they come
    back as stored, checked but never decompressed (recovery needs only the headers).
    """

    def __init__(
        self,
        io: FileIO,
        fd: int,
        path: str,
        salt: int,
        offset: int,
        next_lsn: int,
        expand: int | None = None,
    ) -> None:
        self.io = io
        self.fd = fd
        self.path = path
        self.salt = salt
        self.offset = offset
        self.next_lsn = next_lsn
        self.end: str | None = None
        self.index: Index | None = None  # from the seal frame, once end == "sealed"
        self.seal_size = 0
        self.file_size = io.size(fd)
        self.expand = expand

    def batches(self, max_bytes: int = _CHUNK) -> list[tuple[int, fmt.BatchHeader, bytes]]:
        """Read and check the next batches: about `max_bytes` of them (of their expanded
        payloads, when expanding), and at least one.

        Returns (offset, header, unpadded payload) for each.

        Raises:
            CorruptionError: (expanding) the first batch is compressed and cannot be
                expanded; a later one ends the list instead, and raises at the next call.
            UnsupportedFormatError: (expanding) likewise, when zstandard is missing.
        """
        out: list[tuple[int, fmt.BatchHeader, bytes]] = []
        if self.end is not None:
            return out
        expanded = 0
        want = min(max(max_bytes, fmt.BATCH_HEADER), self.file_size - self.offset)
        buf = self.io.pread(self.fd, want, self.offset) if want > 0 else b""
        pos = 0
        while True:
            if self.offset >= self.file_size:
                self.end = "eof"
                break
            if pos + fmt.BATCH_HEADER > len(buf):
                if not out:  # the file ends inside this header
                    self.end = _stop_reason(buf[pos:])
                break
            head = self._header(buf, pos)
            if head is None:
                break
            stop = pos + fmt.BATCH_HEADER + head.length
            if stop > len(buf):
                if out:  # the next call reads this batch whole
                    break
                buf = self.io.pread(self.fd, fmt.BATCH_HEADER + head.length, self.offset)
                pos, stop = 0, fmt.BATCH_HEADER + head.length
            payload = buf[pos + fmt.BATCH_HEADER : stop]
            if not fmt.check_batch(head, payload, self.salt):
                self.end = "invalid"
                break
            size = head.size
            if head.compressed and self.expand is not None:
                try:
                    head, payload = self._expanded(head, payload)
                except CorruptionError:
                    if out:  # the batches before it first
                        break
                    raise
                expanded += head.length
            out.append((self.offset, head, payload))
            pos += size
            self.offset += size
            self.next_lsn += head.nrecords
            if expanded >= max_bytes:
                break
        return out

    def _expanded(self, head: fmt.BatchHeader, payload: bytes) -> tuple[fmt.BatchHeader, bytes]:
        assert self.expand is not None
        try:
            return fmt.expand(head, payload, self.expand)
        except fmt.FormatError as exc:
            raise CorruptionError(self.path, self.offset, str(exc)) from None
        except ImportError as exc:
            raise UnsupportedFormatError(
                self.path,
                self.offset,
                f"a batch compressed with zstd: reading it needs {_compress.EXTRA_HINT}",
            ) from exc

    def seek(self, offset: int, lsn: int) -> None:
        """Continue from the batch at `offset`, which starts with `lsn` (from an index)."""
        self.offset, self.next_lsn = offset, lsn

    def skip_to(self, lsn: int) -> None:
        """Move forward to the batch that holds `lsn`, reading headers only (payloads are
        neither read nor checked, so a damaged batch before `lsn` does not stop a read
        that starts after it)."""
        while self.end is None and self.offset < self.file_size:
            want = min(_SKIP_CHUNK, self.file_size - self.offset)
            buf = self.io.pread(self.fd, want, self.offset)
            pos = 0
            while pos + fmt.BATCH_HEADER <= len(buf):
                head = self._header(buf, pos)
                if head is None or head.first_lsn + head.nrecords > lsn:
                    return
                pos += head.size
                self.offset += head.size
                self.next_lsn += head.nrecords
            if pos == 0:
                return

    def _header(self, buf: bytes, pos: int) -> fmt.BatchHeader | None:
        """The header at `pos` if it is that of the batch that must come next; else None
        with `end` set."""
        head = fmt.parse_batch_header(buf, pos)
        if head is None:
            seal = fmt.parse_seal_header(buf, pos)
            if seal is not None:
                self._seal(seal, buf, pos)
            else:
                self.end = _stop_reason(buf[pos : pos + fmt.BATCH_HEADER])
        elif (
            head.first_lsn != self.next_lsn
            or self.offset + fmt.BATCH_HEADER + head.length > self.file_size
        ):
            self.end = "invalid"
            head = None
        return head

    def _seal(self, head: fmt.BatchHeader, buf: bytes, pos: int) -> None:
        """Check the seal frame at `pos` of `buf` (the file's `offset`) and end the walk."""
        self.end = "invalid"
        if head.first_lsn != self.next_lsn or self.offset + head.size > self.file_size:
            return
        start = pos + fmt.BATCH_HEADER
        payload = buf[start : start + head.length]
        if len(payload) < head.length:
            payload = self.io.pread(self.fd, head.length, self.offset + fmt.BATCH_HEADER)
        if fmt.check_batch(head, payload, self.salt):
            self.end = "sealed"
            self.index = Index(*fmt.decode_index(head, payload))
            self.seal_size = head.size


class Index:
    """A segment's sparse index: the first LSN and offset of a batch every
    `fmt.INDEX_INTERVAL` bytes, ascending. Appended to by the writer (on its thread) while
    readers search it: entries are only added at the end, or cut by `truncate`."""

    __slots__ = ("lsns", "offsets")

    def __init__(self, lsns: array[int] | None = None, offsets: array[int] | None = None) -> None:
        self.lsns = array("Q") if lsns is None else lsns
        self.offsets = array("Q") if offsets is None else offsets

    def add(self, lsn: int, offset: int) -> None:
        """Note the batch at `offset` (starting with `lsn`) if it is far enough from the
        last entry."""
        offsets = self.offsets
        if not offsets or offset - offsets[-1] >= fmt.INDEX_INTERVAL:
            self.lsns.append(lsn)
            offsets.append(offset)

    def find(self, lsn: int) -> tuple[int, int] | None:
        """(offset, first LSN) of the last indexed batch starting at or before `lsn`."""
        i = bisect_right(self.lsns, lsn) - 1
        if i < 0:
            return None
        return self.offsets[i], self.lsns[i]

    def truncate(self, lsn: int) -> None:
        """Drop the entries of batches that start after `lsn`."""
        i = bisect_right(self.lsns, lsn)
        del self.lsns[i:]
        del self.offsets[i:]


def _stop_reason(raw: bytes) -> str:
    return "invalid" if raw.strip(b"\0") else "zeros"


@dataclass
class Seal:
    """A valid seal frame found at the end of a segment file."""

    offset: int  # where the seal starts: the end of the segment's data
    next_lsn: int  # the LSN the next segment starts with
    index: Index


def read_seal(io: FileIO, fd: int, salt: int) -> Seal | None:
    """The seal at the very end of a segment file, if it has a valid one (two reads, no
    walk: a sealed segment's file ends with its seal)."""
    size = io.size(fd)
    if size < fmt.SEGMENT_HEADER + fmt.seal_size(0):
        return None
    count = fmt.seal_count(io.pread(fd, 8, size - 8))
    start = size - fmt.seal_size(count)
    if count > size or start < fmt.SEGMENT_HEADER:
        return None
    frame = io.pread(fd, size - start, start)
    head = fmt.parse_seal_header(frame)
    if head is None or not fmt.check_batch(head, frame[fmt.BATCH_HEADER :], salt):
        return None
    return Seal(start, head.first_lsn, Index(*fmt.decode_index(head, frame[fmt.BATCH_HEADER :])))


@dataclass
class Tail:
    """What `scan_tail` found at the end of a segment's data."""

    end: int  # offset just past the last valid batch
    next_lsn: int  # the LSN the next batch must carry
    index: Index  # of the segment's batches
    sealed: bool  # a valid seal frame follows the last batch
    # Just past the last non-zero byte after the data (or the seal) that is no old frame
    # of a recycled file: the end of a torn write, or of the bytes up to `corrupt`.
    junk: int
    corrupt: int | None  # offset of a valid batch beyond invalid bytes (data lost), if any


def scan_tail(
    io: FileIO, fd: int, path: str, first_lsn: int, salt: int, previous_salt: int = 0
) -> Tail:
    """Walk a segment to the end of its valid data, without changing the file.

    In a recycled file (`previous_salt`: the salt it had before), the data is followed by
    the old segment's bytes: the rest of the old frame the data ends in, then old frames,
    which are no torn write. A torn write is one that began where the data ends, so it
    starts with the header of the frame that must come next (its LSN), and it reaches no
    further than where an old frame begins intact (one that checks under the old salt).
    Any valid batch of this segment in between means records are missing, torn write or
    not.
    """
    scan = Scan(io, fd, path, salt, fmt.SEGMENT_HEADER, first_lsn)
    index = Index()
    while scan.end is None:
        for offset, head, _ in scan.batches(8 * _CHUNK):
            index.add(head.first_lsn, offset)
    end = scan.offset
    after = end + scan.seal_size
    stop = scan.file_size
    if previous_salt:
        stop = _stale_start(io, fd, after, stop, previous_salt)
    junk = _last_nonzero(io, fd, after, stop)
    corrupt = _valid_batch_after(scan, after, junk) if junk > after else None
    if previous_salt and corrupt is None and not _starts_frame(io, fd, after, scan.next_lsn):
        junk = after  # the old segment's bytes: nothing of a new write is there
    return Tail(end, scan.next_lsn, index, scan.end == "sealed", junk, corrupt)


def _starts_frame(io: FileIO, fd: int, offset: int, lsn: int) -> bool:
    """Whether a frame header (a batch's or a seal's) for `lsn` is at `offset`: the start
    of a write made there, whole or torn after its header."""
    buf = io.pread(fd, fmt.BATCH_HEADER, offset)
    if len(buf) < fmt.BATCH_HEADER:
        return False
    head = fmt.parse_batch_header(buf) or fmt.parse_seal_header(buf)
    return head is not None and head.first_lsn == lsn


def repair_tail(io: FileIO, fd: int, path: str, tail: Tail) -> bool:
    """Zero a torn tail, so that a later crash cannot mistake its bytes for new ones.
    Returns whether there was one.

    Raises:
        CorruptionError: a valid batch lies beyond invalid bytes (acknowledged data lost).
    """
    if tail.corrupt is not None:
        raise CorruptionError(
            path,
            tail.end,
            f"invalid bytes before a valid batch at offset {tail.corrupt}: "
            "acknowledged records are missing",
        )
    if tail.junk > tail.end and not tail.sealed:
        io.zero_fill(fd, tail.end, tail.junk)
        io.fdatasync(fd)
        return True
    return False


def _stale_start(io: FileIO, fd: int, start: int, stop: int, previous_salt: int) -> int:
    """The first 8-aligned offset after `start` where a frame of the file's previous life
    begins intact (its checksum holds under `previous_salt`), or `stop`.

    The checksum, not the LSN alone, tells an old frame: a record's bytes (or a torn
    write's) that look like an old frame's header do not end the search early."""
    magics = (*_BATCH_MAGICS, fmt.SEAL_MAGIC.to_bytes(4, "little"))
    pos = start + 8
    while pos < stop:
        chunk = io.pread(fd, min(_SKIP_CHUNK, stop - pos) + fmt.BATCH_HEADER, pos)
        found: list[int] = []
        for magic in magics:
            i = chunk.find(magic)
            while i != -1 and i + fmt.BATCH_HEADER <= len(chunk):
                if (pos + i) % 8 == 0:
                    found.append(i)
                i = chunk.find(magic, i + 1)
        for i in sorted(found):
            if pos + i < stop and _is_old_frame(io, fd, chunk, i, pos + i, previous_salt):
                return pos + i
        pos += _SKIP_CHUNK
    return stop


def _is_old_frame(
    io: FileIO, fd: int, chunk: bytes, i: int, offset: int, previous_salt: int
) -> bool:
    """Whether the frame whose header is at `i` of `chunk` (the file's `offset`) is whole
    and checks under `previous_salt`."""
    head = fmt.parse_batch_header(chunk, i) or fmt.parse_seal_header(chunk, i)
    if head is None:
        return False
    start = i + fmt.BATCH_HEADER
    payload = chunk[start : start + head.length]
    if len(payload) < head.length:
        if offset + fmt.BATCH_HEADER + head.length > io.size(fd):
            return False
        payload = io.pread(fd, head.length, offset + fmt.BATCH_HEADER)
    return fmt.check_batch(head, payload, previous_salt)


def zero_after(io: FileIO, fd: int, start: int, previous_salt: int = 0) -> None:
    """Write zeros from `start` to the last non-zero byte of the file (not synced); in a
    recycled file (`previous_salt`: the salt it had before), to where its old frames begin
    intact."""
    stop = io.size(fd)
    if previous_salt:
        stop = _stale_start(io, fd, start, stop, previous_salt)
    end = _last_nonzero(io, fd, start, stop)
    if end > start:
        io.zero_fill(fd, start, end)


def _last_nonzero(io: FileIO, fd: int, start: int, stop: int) -> int:
    """Offset just past the last non-zero byte in [start, stop), or `start` if none."""
    last = start
    pos = start
    while pos < stop:
        chunk = io.pread(fd, min(_CHUNK, stop - pos), pos)
        if not chunk:
            break
        if chunk != (_ZEROS if len(chunk) == _CHUNK else bytes(len(chunk))):  # memcmp: fast
            last = pos + len(chunk.rstrip(b"\0"))
        pos += len(chunk)
    return last


def _valid_batch_after(scan: Scan, start: int, stop: int) -> int | None:
    """Offset of a valid batch of this segment, with an LSN at or past the one that must come
    next, at an aligned offset in (start, stop)."""
    pos = start + 8
    while pos < stop:
        chunk = scan.io.pread(scan.fd, min(_CHUNK, stop - pos) + 3, pos)
        found = []
        for magic in _BATCH_MAGICS:
            i = chunk.find(magic)
            while i != -1:
                found.append(pos + i)
                i = chunk.find(magic, i + 1)
        for at in sorted(found):
            if at % 8 == 0 and at < stop and _is_batch_at(scan, at):
                return at
        pos += _CHUNK
    return None


def _is_batch_at(scan: Scan, offset: int) -> bool:
    head_bytes = scan.io.pread(scan.fd, fmt.BATCH_HEADER, offset)
    if len(head_bytes) < fmt.BATCH_HEADER:
        return False
    head = fmt.parse_batch_header(head_bytes)
    if head is None or head.first_lsn < scan.next_lsn:
        return False
    if offset + fmt.BATCH_HEADER + head.length > scan.file_size:
        return False
    payload = scan.io.pread(scan.fd, head.length, offset + fmt.BATCH_HEADER)
    return fmt.check_batch(head, payload, scan.salt)


def make_spare(io: FileIO, directory: str, size: int, recycled: bool = False) -> tuple[int, int]:
    """Make the spare file (the next segment) `size` bytes long, durably; return its file
    descriptor and, for a `recycled` one (an old segment renamed to the spare's name), the
    salt it had, so that its old frames are known for what they are.

    Preallocation is one fallocate or one ftruncate (see `FileIO.preallocate`), so a
    writer killed meanwhile leaves no half-made spare to finish: recovery removes it. A
    recycled file keeps its blocks, already written: batches cost less landing there.
    """
    fd = io.open(os.path.join(directory, SPARE_NAME), create=True)
    previous = 0
    try:
        if recycled:
            with contextlib.suppress(fmt.FormatError, ValueError):
                previous = fmt.decode_segment_header(io.pread(fd, fmt.SEGMENT_HEADER, 0)).salt
        else:
            io.truncate(fd, 0)
        io.preallocate(fd, size)
        io.fdatasync(fd)
    except BaseException:
        io.close(fd)
        raise
    return fd, previous


def reset_header(io: FileIO, fd: int, first_lsn: int) -> fmt.SegmentHeader:
    """Write a new header (with a new salt, not synced) over a damaged one, so that the
    segment can start over empty: whatever frames follow it can no longer validate."""
    salt = 0
    while salt == 0:
        salt = _salts.getrandbits(32)
    io.pwritev(fd, [fmt.encode_segment_header(first_lsn, salt)], 0)
    return fmt.SegmentHeader(first_lsn, salt)


def install(
    io: FileIO,
    fd: int,
    spare_path: str,
    directory: str,
    first_lsn: int,
    previous_salt: int = 0,
    version: int = fmt.FORMAT_VERSION,
) -> int:
    """Turn a preallocated spare file into the segment starting at `first_lsn` (of format
    `version`) and return the new segment's salt. The caller fsyncs the directory next.

    The header is fdatasync'd before the rename, so a segment that exists under its final
    name after a crash always has a valid header. Until the rename succeeds, the log is
    untouched: a failure leaves only a spare file to discard.
    """
    salt = _salts.getrandbits(32)
    while salt in (0, previous_salt):  # a recycled file's old frames must never validate
        salt = _salts.getrandbits(32)
    io.pwritev(fd, [fmt.encode_segment_header(first_lsn, salt, previous_salt, version)], 0)
    io.fdatasync(fd)
    io.rename(spare_path, os.path.join(directory, segment_name(first_lsn)))
    return salt
