"""`KeyedLog`: a log of (key, value) records with an in-memory index of where each key is.

Theory of operation. Every record of a keyed log is a keyed record (`encode_record`): a
4-byte header, the key, the value; a delete is a tombstone (no value). The index maps each
key to the LSNs of its records since its last delete: one `int` for a key with one record,
an `array('Q')` for more, so that `latest_lsn` is one dict lookup and `records_for` one
slice. It holds exactly the records with LSNs up to `_applied`, applied in LSN order:

- an appender whose LSN is the next one applies its record itself when `append` returns;
  one that comes early (a gap) parks its record in `_early` and waits for the gap to
  close, so that `append` returning means the index has the record (read your writes);
- a gap that nobody would close (an appender cancelled after its record was queued, one
  that raced a `truncate_back`, a record appended around the view) is closed from the log
  itself (`_catch_up`): the log, not the appenders, is the truth, so applying a record
  from either gives the same index. Every appender that parks starts one (or has the
  running one go again after it), so every waiting appender has a catch-up still to
  come: no append waits for ever. One that fails raises its error in the appenders
  waiting, and the next to park starts another. A record that is not a keyed record can
  never be applied: it breaks the view (`BrokenLogError` from then on; reopening raises
  it);
- `truncate_back` rebuilds the index (a delete forgot the history the cut may bring back);
  `truncate_front` and retention need nothing: LSNs below `first_lsn` are skipped on
  every lookup and dropped from memory by the next `keys()`, `len()` or snapshot.

Open rebuilds the index: from the snapshot `KEYINDEX` if one is valid, then by replaying the
records after it; without one, by replaying the whole log. A snapshot covers every record up
to its LSN; it is written (atomically, through the I/O layer, as `META` is) once the log is
durable up to that LSN, in the background every `snapshot_every` records (and at least as
many records as it holds LSNs, so its cost per record stays bounded), and at `close()`. A
snapshot is a cache: one that is damaged, of another log, or ahead of the log (the log lost
records a power loss took, or was cut back) is deleted and the log replayed instead.

Only public names of walasync are used here (`Wal`, `open`, `FileIO`, `Record`, the errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import struct
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from itertools import accumulate, pairwise
from types import TracebackType
from typing import Any, NamedTuple, TypeAlias, TypeVar

from crc32c import crc32c

from ._io import FileIO, read_file, replace_file
from ._open import open as open_wal
from ._opener import Opener
from ._reader import Record
from ._wal import Wal
from .errors import (
    BrokenLogError,
    ClosedError,
    CorruptionError,
    MalformedRecordError,
    TruncatedError,
    WalError,
    map_os_error,
)

__all__ = (
    "INDEX_NAME",
    "KeyedLog",
    "KeyedRecord",
    "decode_record",
    "decode_snapshot",
    "encode_record",
    "encode_snapshot",
    "open_keyed",
)

_log = logging.getLogger("walasync")
T = TypeVar("T")

Key = bytes | str
Buffer = bytes | bytearray | memoryview
Lsns: TypeAlias = "int | array[int]"  # one LSN, or two or more in order

MAX_KEY_SIZE = 0xFFFF  # the format's limit (a u16 length)
_HEAD = struct.Struct("<BBH")  # version, flags, key length
_pack_head = _HEAD.pack
_VERSION = 1
_STR = 1  # flag: the key is str, stored as UTF-8
_DELETE = 2  # flag: a tombstone; no value follows the key
_GAP = 64  # records_for reads LSNs closer than this in one pass rather than seeking again
_CHUNK = 16384  # keys encoded per loop pass while writing a snapshot

INDEX_NAME = "KEYINDEX"
_INDEX_TMP = INDEX_NAME + ".tmp"  # what `replace_file` writes first
_SNAP_MAGIC = b"WALAKIDX"
_SNAP_VERSION = 1
_SNAP_HEAD = struct.Struct("<8sHHI16sQIIQQ")
_SNAP_CRC = struct.Struct("<I")
assert _SNAP_HEAD.size == 64
Stamp: TypeAlias = "tuple[bytes, int, int]"  # (log id, CRC32C of the record at S, its length)


class KeyedRecord(NamedTuple):
    """One record of a keyed log: its LSN, its key, and its value (None: the key was
    deleted at this LSN)."""

    lsn: int
    key: bytes | str
    value: bytes | None

    @classmethod
    def from_record(cls, record: Record, path: str = "") -> KeyedRecord:
        """Decode a `Record` read from a keyed log by other means (a `ReadOnlyWal`, say).

        Raises:
            MalformedRecordError: it is not a keyed record.
        """
        key, value = decode_record(record.data, record.lsn, path)
        return cls(record.lsn, key, value)


# -- the record format (pure) ------------------------------------------------------------------


def _key_bytes(key: object, limit: int) -> tuple[bytes, int]:
    """(the key's bytes, its flags); raises TypeError or ValueError for a bad key."""
    if type(key) is str:
        raw, flags = key.encode(), _STR
    elif isinstance(key, bytes):
        raw, flags = bytes(key), 0
    else:
        raise TypeError(f"a key must be bytes or str, not {type(key).__name__}")
    if len(raw) > limit:
        raise ValueError(f"key of {len(raw)} bytes is over the limit of {limit}")
    return raw, flags


def _index_key(key: object) -> Key:
    """The key as the index holds it (bytes subclasses become bytes)."""
    if type(key) is str or type(key) is bytes:
        return key
    if isinstance(key, bytes):
        return bytes(key)
    raise TypeError(f"a key must be bytes or str, not {type(key).__name__}")


def encode_record(key: Key, value: Buffer | None, max_key_size: int = MAX_KEY_SIZE) -> bytes:
    """The bytes of a keyed record: (key, value), or a delete of `key` if `value` is None.

        0  u8   version (1)
        1  u8   flags: 1 = the key is str (UTF-8), 2 = a delete (no value)
        2  u16  key length K (little-endian)
        4  K    key
      4+K  ...  value (the rest of the record; none for a delete)

    Raises:
        TypeError: the key is not bytes or str, or the value not bytes-like.
        ValueError: the key is over `max_key_size` bytes (or is a str that cannot be
            encoded as UTF-8).
    """
    raw, flags = _key_bytes(key, max_key_size)
    if value is None:
        return _HEAD.pack(_VERSION, flags | _DELETE, len(raw)) + raw
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"a value must be bytes, bytearray or memoryview, not {type(value).__name__}"
        )
    return b"".join((_HEAD.pack(_VERSION, flags, len(raw)), raw, value))


def decode_record(data: bytes, lsn: int = 0, path: str = "") -> tuple[Key, bytes | None]:
    """(key, value) of a keyed record; value None for a delete. Every valid record is
    canonical: encoding what this returns gives `data` back.

    Raises:
        MalformedRecordError: `data` is not a keyed record (naming `path` and `lsn`).
    """
    if len(data) < 4:
        raise MalformedRecordError(path, lsn, f"{len(data)} bytes, short of a keyed header")
    version, flags, size = _HEAD.unpack_from(data)
    if version != _VERSION:
        raise MalformedRecordError(path, lsn, f"keyed record version {version}, not 1")
    if flags & ~(_STR | _DELETE):
        raise MalformedRecordError(path, lsn, f"unknown keyed record flags {flags:#x}")
    end = 4 + size
    if end > len(data):
        raise MalformedRecordError(path, lsn, f"key of {size} bytes in a {len(data)}-byte record")
    key: Key = data[4:end]
    if flags & _STR:
        try:
            key = data[4:end].decode()
        except UnicodeDecodeError:
            raise MalformedRecordError(path, lsn, "a str key that is not UTF-8") from None
    if flags & _DELETE:
        if end != len(data):
            raise MalformedRecordError(path, lsn, "a delete with a value")
        return key, None
    return key, data[end:]


# -- the index snapshot (pure) -----------------------------------------------------------------


class SnapshotError(Exception):
    """KEYINDEX is damaged or not a keyed index snapshot (it is then ignored)."""


def encode_snapshot(
    items: Iterable[tuple[Key, Lsns]], first: int, upto: int, stamp: Stamp
) -> bytes:
    """The bytes of KEYINDEX for the index entries `items`, keeping the LSNs from `first` to
    `upto` (the LSN it covers); `stamp` is (the log's id, CRC32C and length of the record
    at `upto`): what tells at open that the snapshot is of this log as it is.

        0   8  magic "WALAKIDX"
        8  u16 version (1)          10 u16 flags (0)          12 u32 reserved (0)
       16  16  the log's id (`Wal.log_id`)
       32  u64 LSN covered: every record up to it is in the index
       40  u32 CRC32C of the record at that LSN    44 u32 its length
       48  u64 K keys                               56 u64 M LSNs
       64  K u8 key flags (1: str), K u16 key lengths, K u32 LSN counts,
           the keys' bytes, M u64 LSNs (each key's, ascending, in key order)
      end  u32 CRC32C of everything before
    """
    builder = _Builder(first, upto)
    builder.add(items)
    return builder.finish(stamp)


class _Builder:
    """Builds a snapshot in pieces, so that a large index is encoded over several loop
    passes (`add` per chunk of entries, then `finish`)."""

    def __init__(self, first: int, upto: int) -> None:
        self.first, self.upto = first, upto
        self.flags = bytearray()
        self.sizes = array("H")
        self.counts = array("I")
        self.keys: list[bytes] = []
        self.lsns = array("Q")

    def add(self, items: Iterable[tuple[Key, Lsns]]) -> None:
        first, upto = self.first, self.upto
        for key, v in items:
            if isinstance(v, int):
                if not first <= v <= upto:
                    continue
                self.lsns.append(v)
                n = 1
            else:
                lo, hi = bisect_left(v, first), bisect_right(v, upto)
                if lo >= hi:
                    continue
                self.lsns.extend(v[lo:hi])
                n = hi - lo
            if type(key) is str:
                raw = key.encode()
                self.flags.append(1)
            else:
                raw = key  # type: ignore[assignment]
                self.flags.append(0)
            self.keys.append(raw)
            self.sizes.append(len(raw))
            self.counts.append(n)

    def finish(self, stamp: Stamp) -> bytes:
        arrays = [self.sizes, self.counts, self.lsns]
        if sys.byteorder == "big":  # pragma: no cover - the format is little-endian
            arrays = [array(a.typecode, a) for a in arrays]
            for a in arrays:
                a.byteswap()
        sizes, counts, lsns = arrays
        head = _SNAP_HEAD.pack(
            _SNAP_MAGIC,
            _SNAP_VERSION,
            0,
            0,
            stamp[0],
            self.upto,
            stamp[1],
            stamp[2],
            len(self.keys),
            len(self.lsns),
        )
        body = b"".join(
            (head, self.flags, sizes.tobytes(), counts.tobytes(), *self.keys, lsns.tobytes())
        )
        return body + _SNAP_CRC.pack(crc32c(body))


def decode_snapshot(data: bytes, first: int = 1) -> tuple[int, Stamp, dict[Key, Lsns]]:
    """(LSN covered, stamp, index) of a KEYINDEX, keeping LSNs from `first` on.

    Raises:
        SnapshotError: it is damaged, or not a keyed index snapshot of this version.
    """
    if len(data) < _SNAP_HEAD.size + _SNAP_CRC.size:
        raise SnapshotError("KEYINDEX is incomplete")
    magic, version, _f, _r, log_id, upto, fcrc, flen, nkeys, nlsns = _SNAP_HEAD.unpack_from(data)
    if magic != _SNAP_MAGIC:
        raise SnapshotError("KEYINDEX is not a keyed index snapshot (bad magic)")
    (crc,) = _SNAP_CRC.unpack_from(data, len(data) - _SNAP_CRC.size)
    if crc != crc32c(memoryview(data)[: len(data) - _SNAP_CRC.size]):
        raise SnapshotError("KEYINDEX checksum mismatch")
    if version != _SNAP_VERSION:
        raise SnapshotError(f"KEYINDEX version {version}; this walasync reads {_SNAP_VERSION}")
    pos = _SNAP_HEAD.size
    if pos + 7 * nkeys + 8 * nlsns + _SNAP_CRC.size > len(data):
        raise SnapshotError("KEYINDEX is shorter than its counts say")
    view = memoryview(data)
    flags = bytes(view[pos : pos + nkeys])
    pos += nkeys
    sizes, counts, lsns = array("H"), array("I"), array("Q")
    sizes.frombytes(view[pos : pos + 2 * nkeys])
    pos += 2 * nkeys
    counts.frombytes(view[pos : pos + 4 * nkeys])
    pos += 4 * nkeys
    if sys.byteorder == "big":  # pragma: no cover
        sizes.byteswap()
        counts.byteswap()
    keys_at = pos
    pos += sum(sizes)
    if pos + 8 * nlsns + _SNAP_CRC.size != len(data) or sum(counts) != nlsns:
        raise SnapshotError("KEYINDEX's sections do not add up")
    lsns.frombytes(view[pos : pos + 8 * nlsns])
    if sys.byteorder == "big":  # pragma: no cover
        lsns.byteswap()
    if (
        flags.translate(None, b"\x00\x01")
        or 0 in counts
        or (nlsns and not 1 <= min(lsns) <= max(lsns) <= upto)
    ):
        raise SnapshotError("KEYINDEX holds invalid entries")
    # Whole-list comprehensions rather than one loop with branches: about twice as fast
    # for a million keys.
    bounds = list(accumulate(sizes, initial=keys_at))
    try:
        keys: list[Key] = [
            data[a:b].decode() if f else data[a:b]
            for f, (a, b) in zip(flags, pairwise(bounds))  # noqa: B905 - same lengths
        ]
    except UnicodeDecodeError:
        raise SnapshotError("KEYINDEX holds a str key that is not UTF-8") from None
    values: Sequence[Lsns]
    if nlsns == nkeys:  # one LSN per key
        values = lsns.tolist()
    else:
        ends = list(accumulate(counts, initial=0))
        values = [lsns[a] if b - a == 1 else lsns[a:b] for a, b in pairwise(ends)]
    index = dict(zip(keys, values, strict=True))
    if len(index) != nkeys:
        raise SnapshotError("KEYINDEX holds a key twice")
    if nlsns and min(lsns) < first:
        for key, v in list(index.items()):  # truncated since it was written: rare
            live = _live(v, first)
            if live is None:
                del index[key]
            else:
                index[key] = live
    return upto, (log_id, fcrc, flen), index


def _live(v: Lsns | None, first: int) -> Lsns | None:
    """The LSNs of `v` from `first` on (None: none left)."""
    if v is None:
        return None
    if isinstance(v, int):
        return v if v >= first else None
    if v[0] >= first:
        return v
    if v[-1] < first:
        return None
    live = v[bisect_left(v, first) :]
    return live if len(live) > 1 else live[0]


# -- the snapshot file (blocking; through the I/O layer, off the loop) --------------------------


def _read_index(io: FileIO, directory: str) -> bytes | None:
    return read_file(io, os.path.join(directory, INDEX_NAME))


def _write_index(io: FileIO, directory: str, data: bytes) -> None:
    """Replace KEYINDEX with `data`, atomically and durably (as META is written)."""
    replace_file(io, directory, INDEX_NAME, [data])


def _remove_index(io: FileIO, directory: str) -> None:
    """Delete KEYINDEX durably (a stale one must not outlive the reason it is stale)."""
    removed = False
    for name in (INDEX_NAME, _INDEX_TMP):
        with contextlib.suppress(FileNotFoundError):
            io.unlink(os.path.join(directory, name))
            removed = True
    if removed:
        io.fsync_dir(directory)


# -- the keyed log ------------------------------------------------------------------------------


class KeyedLog:
    """A log of keyed records with an index of each key's LSNs; get one from
    `walasync.open_keyed`.

    Use it from the event loop that opened it. Append through it only: every record of
    its log must be a keyed record (`wal` is there for `read`, `sync` and its state).
    """

    def __init__(self, wal: Wal, io: FileIO, max_key_size: int, snapshot_every: int | None):
        self._wal = wal
        self._io = io
        self._max_key = max_key_size
        self._every = snapshot_every
        self._map: dict[Key, Lsns] = {}
        self._applied = 0  # every record up to this LSN is in the index
        self._early: dict[int, tuple[Key, bool]] = {}  # records past a gap: LSN -> (key, delete)
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # (LSN, seq, fut) heap
        self._seq = 0
        self._gen = 0  # bumped by truncate_back: appends begun before it do not apply
        self._rebuilt: asyncio.Future[None] | None = None  # set while truncate_back rebuilds
        self._pruned = 1  # first_lsn the index was last pruned to
        self._snap_lsn = 0  # the LSN the snapshot on disk covers (0: none)
        self._snap_base = 0  # the LSN of the last snapshot written or tried: the next is due
        self._snap_at = 1 << 64 if snapshot_every is None else snapshot_every
        self._snapshotter: asyncio.Task[None] | None = None
        self._catcher: asyncio.Task[None] | None = None
        self._again = False  # another catch-up is needed after the running one
        self._lifecycle = asyncio.Lock()  # snapshots and truncate_back, one at a time
        self._wal_append = wal.append  # bound once: `append` is the hot path
        self._closer: asyncio.Future[None] | None = None
        self._released = False  # closed: appenders resuming from now on do not wait
        self._failure: BaseException | None = None
        self.replayed = 0
        """Records read from the log at open to rebuild the index (after the snapshot)."""

    # -- state ----------------------------------------------------------------------------

    @property
    def wal(self) -> Wal:
        """The underlying log: read it, `sync` it; do not append to it or cut it back."""
        return self._wal

    @property
    def path(self) -> str:
        return self._wal.path

    @property
    def first_lsn(self) -> int:
        return self._wal.first_lsn

    @property
    def last_lsn(self) -> int:
        return self._wal.last_lsn

    @property
    def snapshot_lsn(self) -> int:
        """The LSN the index snapshot on disk covers (0: there is none)."""
        return self._snap_lsn

    @property
    def closed(self) -> bool:
        return self._closer is not None

    def _check(self) -> None:
        if self._closer is not None:
            raise ClosedError("the keyed log is closed")
        if self._failure is not None:
            raise self._broken()

    def _broken(self) -> BrokenLogError:
        exc = BrokenLogError(
            f"the key index could not be kept in step with the log: {self._failure!r}"
        )
        exc.__cause__ = self._failure
        return exc

    # -- writing ----------------------------------------------------------------------------

    async def append(self, key: Key, value: Buffer) -> int:
        """Append `value` under `key`; return its LSN once it is acknowledged (durable in
        the default mode) and in the index: `latest(key)` then sees it.

        Raises:
            TypeError: the key is not bytes or str, or the value not bytes-like.
            ValueError: the key is over `max_key_size` bytes.
            ClosedError, RecordTooLargeError, BrokenLogError, WrongLoopError: as
            `Wal.append`; `BrokenLogError` also once the index met a record it cannot take.
            MalformedRecordError: the index cannot take a record before this one from
                the log: it is not a keyed record (appended around the view). This
                record is in the log; the view is broken from then on.
            WalError: the index could not read a record before this one from the log
                (this one is in the log; the next append or `sync` reads it again).
        """
        # The hot path, written out: one coroutine between the caller and Wal.append.
        if type(key) is str:
            raw, flags = key.encode(), _STR
        else:
            raw, flags = _key_bytes(key, MAX_KEY_SIZE)
            key = raw
        if len(raw) > self._max_key:
            raise ValueError(f"key of {len(raw)} bytes is over the limit of {self._max_key}")
        if type(value) is not bytes:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(
                    f"a value must be bytes, bytearray or memoryview, not {type(value).__name__}"
                )
            value = bytes(value)
        if self._closer is not None or self._failure is not None:
            self._check()
        gen = self._gen
        try:
            lsn = await self._wal_append(_pack_head(_VERSION, flags, len(raw)) + raw + value)
        except asyncio.CancelledError:
            self._orphan()  # its record may still be written: the log will tell
            raise
        if lsn == self._applied + 1 and gen == self._gen and self._rebuilt is None:
            self._index_add(key, lsn)
            self._applied = lsn
            if lsn - self._snap_base >= self._snap_at:
                self._snapshot_soon()
            if self._early or self._waiters:
                self._drain()
            return lsn
        await self._arrive(gen, [(lsn, key, False)])
        return lsn

    async def delete(self, key: Key) -> int:
        """Append a delete of `key` (a tombstone); return its LSN. The index forgets the key
        and its records: `latest(key)` is None, `records_for(key)` yields only records
        appended after it. Raises as `append`."""
        lsns = await self.append_many([(key, None)])
        return lsns[0]

    async def append_many(self, items: Iterable[tuple[Key, Buffer | None]]) -> range:
        """Append (key, value) pairs as one atomic unit (a value of None deletes its key);
        return their LSNs once acknowledged and in the index. Raises as `append`."""
        pairs = [(encode_record(k, v, self._max_key), _index_key(k), v is None) for k, v in items]
        self._check()
        if not pairs:
            return await self._wal.append_many([])
        gen = self._gen
        try:
            lsns = await self._wal.append_many([p[0] for p in pairs])
        except asyncio.CancelledError:
            self._orphan()
            raise
        await self._arrive(gen, [(lsn, p[1], p[2]) for lsn, p in zip(lsns, pairs, strict=True)])
        return lsns

    async def _arrive(self, gen: int, entries: list[tuple[int, Key, bool]]) -> None:
        """Apply acknowledged records that are not simply the next one: park them until the
        gap before them closes, and wait for that (so that the caller's `append` returns
        with its record in the index)."""
        if gen != self._gen:  # a truncate_back came between: the rebuild decides
            self._orphan()
            return
        for lsn, key, deleted in entries:
            if lsn > self._applied or self._rebuilt is not None:
                self._early[lsn] = (key, deleted)
        self._drain()
        if self._applied < entries[-1][0]:
            # Usually the records before are their appenders' to apply, and they resume
            # first (appenders are woken in LSN order); the catch-up closes the gap whatever
            # left it, and raises here if it cannot.
            self._orphan()
            await self._until(entries[-1][0])

    # -- the index ----------------------------------------------------------------------------

    def _apply(self, lsn: int, key: Key, deleted: bool) -> None:
        m = self._map
        if deleted:
            m.pop(key, None)
        else:
            self._index_add(key, lsn)
        self._applied = lsn
        if lsn - self._snap_base >= self._snap_at:
            self._snapshot_soon()

    def _index_add(self, key: Key, lsn: int) -> None:
        """Record that `key` has a record at `lsn` (one LSN as an int, more as an array)."""
        m = self._map
        old = m.get(key)
        if old is None:
            m[key] = lsn
        elif isinstance(old, int):
            m[key] = array("Q", (old, lsn))
        else:
            old.append(lsn)

    def _drain(self) -> None:
        """Apply the parked records that now follow `_applied`; wake who waits for them."""
        if self._rebuilt is not None:
            return
        early = self._early
        while early:
            entry = early.pop(self._applied + 1, None)
            if entry is None:
                break
            self._apply(self._applied + 1, *entry)
        waiters = self._waiters
        while waiters and waiters[0][0] <= self._applied:
            fut = heapq.heappop(waiters)[2]
            if not fut.done():
                fut.set_result(None)

    def _jump(self, applied: int) -> None:
        """The index now holds every record up to `applied` (after a rebuild, or because
        the records before it were truncated): forget what is parked below it."""
        self._applied = applied
        for lsn in [lsn for lsn in self._early if lsn <= applied]:
            del self._early[lsn]
        self._drain()

    async def _until(self, lsn: int) -> None:
        """Wait until the index holds `lsn` (or the log closes, or is cut back).

        Raises:
            WalError: the catch-up that would close the gap before `lsn` failed.
        """
        if self._released:
            return
        fut = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._waiters, (lsn, self._seq, fut))
        await fut

    def _wake_all(self) -> None:
        for _lsn, _seq, fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters = []

    def _fail_waiters(self, exc: BaseException) -> None:
        """Raise `exc` in every appender waiting for the index: the catch-up that would
        close the gap before them failed."""
        for _lsn, _seq, fut in self._waiters:
            if not fut.done():
                fut.set_exception(exc)
        self._waiters = []

    def _prune(self) -> None:
        """Drop from memory what truncation removed from the log (O(keys); only once each
        time `first_lsn` moves)."""
        first = self._wal.first_lsn
        if first <= self._pruned:
            return
        self._pruned = first
        m = self._map
        changed: dict[Key, Lsns | None] = {}
        for key, v in m.items():
            if (v if isinstance(v, int) else v[0]) < first:
                changed[key] = _live(v, first)
        for key, live in changed.items():
            if live is None:
                del m[key]
            else:
                m[key] = live

    def latest_lsn(self, key: Key) -> int | None:
        """The LSN of `key`'s latest record (None: no such key, deleted, or truncated).
        One dict lookup; no I/O."""
        v = self._map.get(_index_key(key))
        if v is None:
            return None
        lsn = v if isinstance(v, int) else v[-1]
        return lsn if lsn >= self._wal.first_lsn else None

    def keys(self) -> list[Key]:
        """Every key with a record in the log (not deleted since, not truncated), in the
        order they first appeared since their last delete. A new list: O(keys)."""
        self._prune()
        return list(self._map)

    def __len__(self) -> int:
        self._prune()
        return len(self._map)

    def __contains__(self, key: object) -> bool:
        try:
            return self.latest_lsn(key) is not None  # type: ignore[arg-type]
        except TypeError:
            return False

    # -- reading -----------------------------------------------------------------------------

    async def latest(self, key: Key) -> KeyedRecord | None:
        """The latest record of `key`, read from the log (None: no such key, or deleted, or
        truncated). Finds it with one lookup, then reads that one record.

        Raises:
            CorruptionError: the record is damaged or not a keyed record.
            ClosedError, WrongLoopError, WalError: as `Wal.read`.
        """
        k = _index_key(key)
        failed = None
        while True:
            lsn = self.latest_lsn(k)
            if lsn is None:
                return None
            async with contextlib.aclosing(self._records(lsn, lsn)) as records:
                async for _lsn, data in records:
                    got, value = decode_record(data, lsn, self.path)
                    if got == k and type(got) is type(k) and value is not None:
                        return KeyedRecord(lsn, got, value)
            # Removed meanwhile: truncated (the index skips it now), or cut back (the
            # index is being rebuilt).
            if self._rebuilt is not None:
                await asyncio.shield(self._rebuilt)
            elif lsn == failed:
                raise TruncatedError(f"the latest record of {k!r}, LSN {lsn}, is gone")
            failed = lsn

    def records_for(self, key: Key) -> AsyncGenerator[KeyedRecord, None]:
        """Async iterator of `key`'s records in LSN order: those in the index when called
        (appended since its last delete, at or above `first_lsn`). Records that a
        truncation removes while it runs are skipped (a `truncate_back` ends it at the
        cut); LSNs close together are read in one pass, others by seeking.

        Raises (during iteration): CorruptionError, WalError, as `Wal.read`.
        """
        k = _index_key(key)
        v = _live(self._map.get(k), self._wal.first_lsn)
        lsns: list[int] | array[int] = [] if v is None else [v] if isinstance(v, int) else v[:]
        return self._fetch(k, lsns)

    async def _fetch(
        self, key: Key, lsns: list[int] | array[int]
    ) -> AsyncGenerator[KeyedRecord, None]:
        n, i = len(lsns), 0
        while i < n:
            j = i
            while j + 1 < n and lsns[j + 1] - lsns[j] <= _GAP:
                j += 1
            p = i
            async with contextlib.aclosing(self._records(lsns[i], lsns[j])) as records:
                async for lsn, data in records:
                    while p <= j and lsns[p] < lsn:
                        p += 1
                    if p > j:
                        break
                    if lsns[p] != lsn:
                        continue
                    got, value = decode_record(data, lsn, self.path)
                    if got == key and type(got) is type(key) and value is not None:
                        yield KeyedRecord(lsn, got, value)
            i = j + 1

    async def _records(self, start: int, end: int) -> AsyncGenerator[Record, None]:
        """The log's records from `start` to `end`, skipping any that a truncate_front
        removes, and ending quietly at a truncate_back's cut."""
        wal = self._wal
        while start <= end:
            start = max(start, wal.first_lsn)
            if start > end:
                return
            try:
                async with contextlib.aclosing(wal.read(start, end)) as records:
                    async for rec in records:
                        start = rec.lsn + 1
                        yield rec
                return
            except TruncatedError:
                if wal.first_lsn <= start:
                    return  # cut back

    def read(
        self, start: int | None = None, end: int | None = None, *, follow: bool = False
    ) -> AsyncGenerator[KeyedRecord, None]:
        """`Wal.read`, decoded: every record (deletes too, with value None) from `start` to
        `end`, or following the log with `follow=True`.

        Raises: as `Wal.read`; during iteration also `MalformedRecordError`.
        """
        return self._decoded(self._wal.read(start, end, follow=follow))

    async def _decoded(
        self, records: AsyncGenerator[Record, None]
    ) -> AsyncGenerator[KeyedRecord, None]:
        path = self.path
        async with contextlib.aclosing(records):
            async for lsn, data in records:
                key, value = decode_record(data, lsn, path)
                yield KeyedRecord(lsn, key, value)

    # -- keeping the index in step with the log -----------------------------------------------

    def _orphan(self) -> None:
        """An append may have a record in the log that it will not apply: catch up from
        the log (once now, and again if another one comes meanwhile)."""
        self._again = True
        if self._closer is None and (self._catcher is None or self._catcher.done()):
            self._catcher = asyncio.ensure_future(self._catch_up_loop())

    async def _catch_up_loop(self) -> None:
        while self._again:
            self._again = False
            try:
                await self._catch_up()
            except Exception as exc:
                if not isinstance(exc, (ClosedError, BrokenLogError)):
                    _log.warning("%s: catching up the key index failed", self.path, exc_info=True)
                self._fail_waiters(exc)  # the gap they wait on stays; the next parker retries
                return

    async def _catch_up(self) -> None:
        """Apply, from the log, every record acknowledged before the call that the index
        lacks.

        Raises:
            CorruptionError: a record there is not a keyed record, or is damaged: the
                view is broken (the appenders waiting get this error, later calls
                `BrokenLogError`).
            BrokenLogError: it was broken before; WalError: as `Wal.sync` and `Wal.read`.
        """
        try:
            await self._catch_up_once()
        except CorruptionError as exc:  # no later attempt could get past it
            if self._failure is None:
                self._failure = exc
                self._early.clear()
                self._fail_waiters(exc)
            raise

    async def _catch_up_once(self) -> None:
        await self._wal.sync()
        while True:
            if self._rebuilt is not None:
                await asyncio.shield(self._rebuilt)
            if self._failure is not None:
                raise self._broken()
            gen, end, first = self._gen, self._wal.last_lsn, self._wal.first_lsn
            if self._applied < first - 1:
                self._jump(first - 1)
            if self._applied >= end:
                return
            path = self.path
            async with contextlib.aclosing(self._records(self._applied + 1, end)) as records:
                async for lsn, data in records:
                    if gen != self._gen or self._rebuilt is not None:
                        break
                    if lsn <= self._applied:
                        continue  # its appender applied it meanwhile
                    key, value = decode_record(data, lsn, path)
                    if lsn > self._applied + 1:  # the records between were truncated
                        self._jump(lsn - 1)
                    self._early[lsn] = (key, value is None)
                    self._drain()
            if gen == self._gen and self._rebuilt is None:
                return

    async def sync(self) -> None:
        """Return once every record appended before the call is durable and in the index
        (appends that were cancelled included: their records are taken from the log).

        Raises:
            MalformedRecordError: a record the index lacks is not a keyed record (appended
                around the view): the view is broken from then on.
            BrokenLogError, ClosedError, WalError: as `Wal.sync` and `Wal.read`.
        """
        self._check()
        await self._catch_up()

    async def _run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking I/O function off the loop; its OSError becomes a WalError."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except OSError as exc:
            raise map_os_error(exc, f"{what} {self.path}") from exc

    async def _build(self) -> tuple[dict[Key, Lsns], int, int, int]:
        """(index, LSN it covers, records replayed, snapshot LSN): from the snapshot if a
        valid one covers part of the log, then from the records after it."""
        wal, io, path = self._wal, self._io, self.path
        index: dict[Key, Lsns] = {}
        snap = 0
        if self._every is None:
            await self._run("removing the key index snapshot of", _remove_index, io, path)
        else:
            data = await self._run("reading the key index snapshot of", _read_index, io, path)
            if data is not None:
                why = ""
                try:
                    upto, stamp, index = await asyncio.get_running_loop().run_in_executor(
                        None, decode_snapshot, data, wal.first_lsn
                    )
                except SnapshotError as exc:
                    why = str(exc)
                else:
                    if upto < wal.first_lsn and stamp[0] == wal.log_id:
                        index = {}  # all of it truncated: nothing to check, nothing lost
                    elif await self._stamp(upto) != stamp:  # None past the end
                        why = (
                            "it is of another log"
                            if stamp[0] != wal.log_id
                            else f"it covers LSN {upto}, past the log's last ({wal.last_lsn})"
                            if upto > wal.last_lsn
                            else f"the record at LSN {upto} is not the one it was taken after"
                        )
                    else:
                        snap = upto
                if why:
                    _log.warning("%s: ignoring the key index snapshot: %s", path, why)
                    await self._run("removing the key index snapshot of", _remove_index, io, path)
                    index = {}
        end = wal.last_lsn
        replayed = await self._replay(index, snap + 1, end)
        return index, end, replayed, snap

    async def _replay(self, index: dict[Key, Lsns], start: int, end: int) -> int:
        """Apply the log's records from `start` to `end` to `index`; return how many. The
        hot loop of open: records straight from `Wal.read`, the usual record decoded
        inline (anything unusual goes to `decode_record`, which raises)."""
        wal, path, unpack = self._wal, self.path, _HEAD.unpack_from
        done = 0
        while True:
            start = max(start, wal.first_lsn)  # retention may truncate under a rebuild
            if start > end:
                return done
            try:
                async with contextlib.aclosing(wal.read(start, end)) as records:
                    async for lsn, data in records:
                        start = lsn + 1
                        done += 1
                        size = len(data)
                        if size < 4:
                            decode_record(data, lsn, path)
                        version, flags, klen = unpack(data)
                        stop = 4 + klen
                        if version != _VERSION or flags > 3 or stop > size:
                            decode_record(data, lsn, path)
                        key: Key = data[4:stop]
                        if flags & _STR:
                            try:
                                key = key.decode()  # type: ignore[union-attr]
                            except UnicodeDecodeError:
                                decode_record(data, lsn, path)
                        if flags & _DELETE:
                            if stop != size:
                                decode_record(data, lsn, path)
                            index.pop(key, None)
                            continue
                        old = index.get(key)
                        if old is None:
                            index[key] = lsn
                        elif isinstance(old, int):
                            index[key] = array("Q", (old, lsn))
                        else:
                            old.append(lsn)
                return done
            except TruncatedError:
                if wal.first_lsn <= start:
                    raise

    async def _load(self) -> None:
        self._map, applied, self.replayed, self._snap_lsn = await self._build()
        self._snap_base = self._snap_lsn
        self._applied = applied
        self._pruned = self._wal.first_lsn
        if self._every is not None:  # the snapshot's cost is its LSNs: due after as many
            lsns = sum(1 if isinstance(v, int) else len(v) for v in self._map.values())
            self._snap_at = max(self._every, lsns)

    async def _stamp(self, lsn: int) -> Stamp | None:
        """(log id, CRC32C, length) of the record at `lsn`; None if it is gone."""
        async with contextlib.aclosing(self._records(lsn, lsn)) as records:
            async for _lsn, data in records:
                return self._wal.log_id, crc32c(data), len(data)
        return None

    # -- lifecycle ------------------------------------------------------------------------------

    async def truncate_front(self, lsn: int) -> None:
        """`Wal.truncate_front`: remove every record below `lsn`. Keys whose records are
        all below it vanish from the index; the memory they held goes at the next
        `keys()`, `len()` or snapshot. Raises as `Wal.truncate_front`."""
        self._check()
        await self._wal.truncate_front(lsn)

    async def truncate_back(self, lsn: int) -> None:
        """`Wal.truncate_back`: remove every record after `lsn`, then rebuild the index
        (from a snapshot at or below `lsn`, or the log); a snapshot past `lsn` is deleted
        first. Shielded: cancelling the caller does not stop it half way. Appends racing
        the cut return their LSN without waiting for the index.

        Raises:
            ValueError: as `Wal.truncate_back` (nothing changes).
            BrokenLogError: the cut or the rebuild failed; reopen the log.
            ClosedError, WrongLoopError.
        """
        self._check()
        await asyncio.shield(self._truncate_back(lsn))

    async def _truncate_back(self, lsn: int) -> None:
        async with self._lifecycle:
            if self._snap_lsn > lsn:
                await self._run(
                    "removing the key index snapshot of", _remove_index, self._io, self.path
                )
                self._snap_lsn = 0
            rebuilt = asyncio.get_running_loop().create_future()
            self._rebuilt = rebuilt  # from now on appends park and readers wait
            try:
                await self._wal.truncate_back(lsn)
                self._gen += 1
                self._applied = min(self._applied, lsn)
                self._early.clear()  # parked before the cut: the rebuild reads the log instead
                self._wake_all()  # appenders waiting for LSNs the cut may have removed
                index, applied, _n, snap = await self._build()
                self._map, self._snap_lsn, self._pruned = index, snap, self._wal.first_lsn
                self._snap_base = snap
                self._applied = applied
                for parked in [n for n in self._early if n <= applied]:
                    del self._early[parked]
            except ValueError:
                raise  # nothing changed: the index stands
            except Exception as exc:
                self._failure = exc
                raise self._broken() from exc
            except BaseException as exc:  # cancelled: the index is just as unknown
                self._failure = exc
                raise
            finally:
                self._rebuilt = None
                rebuilt.set_result(None)
                if self._failure is None:
                    self._drain()

    async def snapshot(self) -> int:
        """Write the index snapshot now (the log is made durable up to it first); return the
        LSN it covers. Open then replays only the records after it."""
        self._check()
        async with self._lifecycle:
            return await self._snapshot()

    def _snapshot_soon(self) -> None:
        if self._closer is None and (self._snapshotter is None or self._snapshotter.done()):
            self._snapshotter = asyncio.ensure_future(self._auto_snapshot())

    async def _auto_snapshot(self) -> None:
        try:
            async with self._lifecycle:
                if self._closer is None and self._failure is None:
                    await self._snapshot()
        except (ClosedError, BrokenLogError):
            pass
        except Exception:
            _log.warning("%s: writing the key index snapshot failed", self.path, exc_info=True)

    async def _snapshot(self) -> int:
        upto, first = self._applied, self._wal.first_lsn
        self._snap_base = upto  # tried: if it fails, the next try waits for as many records
        if upto < first or upto == self._snap_lsn:
            return self._snap_lsn
        items = list(self._map.items())  # the index as of `upto`; arrays only grow after it
        builder = _Builder(first, upto)
        for i in range(0, len(items), _CHUNK):
            builder.add(items[i : i + _CHUNK])
            await asyncio.sleep(0)
        stamp = await self._stamp(upto)
        if stamp is None:  # truncated meanwhile: next time
            return self._snap_lsn
        data = builder.finish(stamp)
        if self._wal.synced_lsn < upto:
            await self._wal.sync()
        await self._run(
            "writing the key index snapshot of", _write_index, self._io, self.path, data
        )
        self._snap_lsn = upto
        if self._every is not None:  # the next one when as many records came as it holds
            self._snap_at = max(self._every, len(builder.lsns))
        return upto

    async def close(self) -> None:
        """Let appends in progress finish, write the index snapshot (if enabled and behind),
        then close the log. Idempotent; shielded against cancellation."""
        if self._closer is None:
            self._closer = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closer)

    async def _close(self) -> None:
        try:
            if self._catcher is not None:
                self._catcher.cancel()
                await asyncio.wait([self._catcher])
            with contextlib.suppress(WalError):  # a broken log: no snapshot either
                await self._catch_up()  # every append queued before close() is in the index
            async with self._lifecycle:  # a snapshot or truncate_back in progress ends first
                if (
                    self._every is not None
                    and self._failure is None
                    and self._applied > self._snap_lsn
                    and not self._wal.closed
                ):
                    try:
                        await self._snapshot()
                    except WalError:
                        _log.warning(
                            "%s: writing the key index snapshot failed", self.path, exc_info=True
                        )
        finally:
            self._released = True  # caught up as far as it will be: nobody waits from now on
            self._wake_all()
            await self._wal.close()

    async def __aenter__(self) -> KeyedLog:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "broken" if self._failure else "open"
        return (
            f"<KeyedLog {self.path!r} {state} keys={len(self._map)} applied={self._applied} "
            f"parked={len(self._early)} snapshot_lsn={self._snap_lsn} {self._wal!r}>"
        )


async def _open(
    path: str | os.PathLike[str],
    io: FileIO,
    max_key_size: int,
    snapshot_every: int | None,
    options: dict[str, Any],
) -> KeyedLog:
    wal = await open_wal(path, io=io, **options)
    try:
        kv = KeyedLog(wal, io, max_key_size, snapshot_every)
        await kv._load()
    except BaseException:
        await wal.close()
        raise
    return kv


def open_keyed(
    path: str | os.PathLike[str],
    *,
    io: FileIO | None = None,
    max_key_size: int = 1024,
    snapshot_every: int | None = 100_000,
    **options: Any,
) -> Opener[KeyedLog]:
    """Open (creating if needed) a keyed log in directory `path`: `walasync.open(path,
    io=io, **options)`, then its index rebuilt from the snapshot and the log.

    Use `kv = await walasync.open_keyed(path)` or `async with walasync.open_keyed(path) as
    kv:`. `max_key_size` (1 to 65535 bytes) bounds the keys `append` accepts;
    `snapshot_every` is the number of records after which the index snapshot is written
    again in the background (at least as many as the last one held LSNs), or None for none
    (any existing one is deleted).

    Raises:
        ValueError: an option is out of range (and as `walasync.open`).
        CorruptionError: a record of the log is not a keyed record (`MalformedRecordError`,
            naming its LSN), and as `walasync.open`.
    """
    if (
        not isinstance(max_key_size, int)
        or isinstance(max_key_size, bool)
        or not 1 <= max_key_size <= MAX_KEY_SIZE
    ):
        raise ValueError(
            f"max_key_size must be an int from 1 to {MAX_KEY_SIZE}, not {max_key_size!r}"
        )
    if snapshot_every is not None and (
        not isinstance(snapshot_every, int)
        or isinstance(snapshot_every, bool)
        or snapshot_every < 1
    ):
        raise ValueError(f"snapshot_every must be a positive int or None, not {snapshot_every!r}")
    if options.get("readonly"):
        raise ValueError(
            "a keyed log is opened for writing; read one with walasync.open(readonly=True)"
        )
    layer = io or FileIO()
    return Opener(lambda: _open(path, layer, max_key_size, snapshot_every, options))
