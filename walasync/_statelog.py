"""State replay with snapshots: an in-memory state that a log keeps durable.

A `StateLog` holds a state (any object) that only `apply(state, event) -> state` changes.
Each event is appended to a `Wal` and applied once it is durable; a checkpoint writes the
state to a snapshot and removes the records it covers from the front of the log; opening
loads the snapshot and replays the records after it. It uses only the log's public API
(`append`, `read`, `sync`, `truncate_front`, `truncate_back`, `log_id`) and the I/O layer
the log was opened with, so `walasync.testing.SimulatedDisk` crashes its files too.

Theory of operation.

- Events are applied one at a time, on the loop, in LSN order. Concurrent `apply` calls
  still share batches (group commit): each appends in a task of its own and registers its
  event under the LSN the append returned, and events are applied as soon as every lower
  LSN is, whatever order the appenders resume in. LSNs of successful appends are dense and
  only this object appends, so no event waits for an LSN that never comes. The task runs
  to the end even if its caller is cancelled: an event that became durable is applied, as
  replay would apply it.
- What is applied live is what replay will apply: the event decoded from the bytes that
  were logged, and after a checkpoint, the state decoded from the snapshot's bytes.
- The snapshot, `STATE` in the log's directory (the log ignores names that are not its
  own), holds the log's id, the LSN it covers and a CRC32C. It replaces the old one
  atomically (`replace_file`: temporary file, fdatasync, rename, directory fsync) before
  any record it covers leaves the log, so a crash at any step leaves the old snapshot and
  every record after it, or the new one and every record after that. Opening finishes a
  checkpoint whose truncation did not happen.
- `undo` and `close` shut a gate to new `apply` calls and wait until those in flight are
  applied. `checkpoint` and `undo` run one at a time, each in a shielded task: cancelling
  the caller does not stop a half-done one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import struct
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from threading import get_ident as _get_ident
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from crc32c import crc32c

from ._io import FileIO, read_file, replace_file
from ._open import open as open_wal
from ._opener import Opener, require_loop
from ._options import Options
from ._wal import Wal
from .errors import (
    ApplyError,
    BrokenLogError,
    ClosedError,
    CorruptionError,
    NothingToUndoError,
    UnsupportedFormatError,
    map_os_error,
)

__all__ = ("SNAPSHOT_NAME", "JSONSerializer", "Serializer", "StateLog")

S = TypeVar("S")
E = TypeVar("E")
T = TypeVar("T")
R = TypeVar("R")

_log = logging.getLogger("walasync")

SNAPSHOT_NAME = "STATE"
MiB = 1 << 20

# STATE (little-endian): a 52-byte header, then the state as the state serializer wrote it.
#   0  8    magic "WALSTATE"
#   8  u16  version (1)
#  10  u16  flags (0)
#  12  u32  reserved (0)
#  16  16   log id: the `Wal.log_id` of the log the snapshot was made from
#  32  u64  LSN: the state is the result of every event up to this one
#  40  u64  length of the state in bytes
#  48  u32  CRC32C of bytes 0..48 and of the state
_MAGIC = b"WALSTATE"
_VERSION = 1
_HEAD = struct.Struct("<8sHHI16sQQ")
_CRC = struct.Struct("<I")
HEADER = _HEAD.size + _CRC.size


def encode_snapshot(log_id: bytes, lsn: int, state: bytes) -> list[bytes]:
    """A snapshot file's bytes, as buffers (the state is not copied)."""
    head = _HEAD.pack(_MAGIC, _VERSION, 0, 0, log_id, lsn, len(state))
    return [head + _CRC.pack(crc32c(state, crc32c(head))), state]


def decode_snapshot(path: str, data: bytes) -> tuple[bytes, int, bytes]:
    """(log id, LSN, state bytes) of a snapshot file's contents.

    Raises:
        CorruptionError: the file is damaged (or not a snapshot).
        UnsupportedFormatError: it was written in a version this walasync cannot read.
    """
    if len(data) < HEADER or data[:8] != _MAGIC:
        raise CorruptionError(path, 0, "not a walasync snapshot (short, or bad magic)")
    _, version, _flags, _reserved, log_id, lsn, length = _HEAD.unpack_from(data)
    (crc,) = _CRC.unpack_from(data, _HEAD.size)
    if len(data) != HEADER + length:
        raise CorruptionError(
            path,
            min(len(data), HEADER + length),
            f"snapshot of {len(data)} bytes, not the {HEADER + length} its header says",
        )
    state = data[HEADER:]
    if crc != crc32c(state, crc32c(data[: _HEAD.size])):
        raise CorruptionError(path, 0, "snapshot checksum mismatch")
    if version != _VERSION:
        raise UnsupportedFormatError(
            path, 8, f"snapshot format version {version}; this walasync reads {_VERSION}"
        )
    return log_id, lsn, state


class Serializer(Protocol[T]):
    """Turns events (or states) into bytes and back: bytes in, bytes out.

    `loads(dumps(x))` must give back what `apply` should see: `StateLog` applies the
    decoded value, never the original. The `pickle` module fits as it is; so do objects
    with these two methods around msgspec, orjson or cbor2 (see README.md).
    """

    def dumps(self, obj: T, /) -> bytes: ...

    def loads(self, data: bytes, /) -> T: ...


class JSONSerializer:
    """JSON in UTF-8, the default serializer: dicts with string keys, lists, strings,
    numbers, booleans and None. Tuples come back as lists and other dict keys as strings,
    and that is what `apply` sees, live as after a reopen."""

    _encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    _decode = json.JSONDecoder().decode

    def dumps(self, obj: Any, /) -> bytes:
        return self._encode(obj).encode()

    def loads(self, data: bytes, /) -> Any:
        return self._decode(data.decode())


_JSON = JSONSerializer()


def _read_snapshot(io: FileIO, directory: str) -> bytes | None:
    """The snapshot file's contents (None if there is none), after deleting a temporary
    file a crashed checkpoint left (on a worker thread)."""
    with contextlib.suppress(FileNotFoundError):
        io.unlink(os.path.join(directory, SNAPSHOT_NAME + ".tmp"))
    return read_file(io, os.path.join(directory, SNAPSHOT_NAME))


def _positive_or_none(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, not {value!r}")


class StateLog(Generic[S, E]):
    """An in-memory state kept durable by a log of the events that made it; open one with
    `StateLog.open`.

    `await apply(event)` appends the event and, once it is durable, applies it
    (`state = apply(state, event)`); `state` is the result. `checkpoint()` writes the state
    to a snapshot and drops the log records it covers; opening loads the latest snapshot
    and replays the events after it. `undo()` removes the last event and rebuilds the
    state. Use it from the event loop that opened it.
    """

    def __init__(
        self,
        wal: Wal,
        io: FileIO,
        apply: Callable[[S, E], S],
        initial: Callable[[], S],
        serializer: Serializer[E],
        state_serializer: Serializer[S],
        checkpoint_bytes: int | None,
        checkpoint_records: int | None,
    ) -> None:
        self._wal = wal
        self._io = io
        self._fn = apply
        self._initial = initial
        self._events = serializer
        self._states = state_serializer
        self._max_bytes = checkpoint_bytes
        self._max_records = checkpoint_records
        self._loop = asyncio.get_running_loop()
        self._thread = _get_ident()
        self._snapshot_path = os.path.join(wal.path, SNAPSHOT_NAME)
        self._state: S = initial()
        self._applied = 0  # LSN of the last applied event
        self._snapshot_lsn = 0  # what the durable snapshot covers (0: no snapshot)
        # `undo` stops above this: a snapshot may cover events up to here (it is past
        # `_snapshot_lsn` after a checkpoint failed once its rename may have happened).
        self._floor = 0
        self._since_records = 0  # events applied after the snapshot, and their bytes
        self._since_bytes = 0
        # Events whose append returned, waiting for every lower LSN to be applied.
        self._ready: dict[int, tuple[E, int, asyncio.Future[int]]] = {}
        self._appends: set[asyncio.Task[int]] = set()
        self._in_flight = 0  # apply calls past the gate and not yet applied or failed
        self._idle = asyncio.Event()
        self._idle.set()
        self._gate = asyncio.Event()  # cleared while an undo runs
        self._gate.set()
        self._lifecycle = asyncio.Lock()  # one checkpoint or undo at a time
        self._failure: BaseException | None = None
        self._closer: asyncio.Future[None] | None = None
        self._closed = False

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        initial: Callable[[], S],
        apply: Callable[[S, E], S],
        serializer: Serializer[E] = _JSON,
        state_serializer: Serializer[S] | None = None,
        checkpoint_bytes: int | None = 64 * MiB,
        checkpoint_records: int | None = None,
        io: FileIO | None = None,
        options: Options | None = None,
    ) -> Opener[StateLog[S, E]]:
        """Open (creating if needed) the state kept in directory `path`: load its snapshot,
        replay the events after it, and finish a checkpoint a crash cut short.

        Use `s = await StateLog.open(...)` or `async with StateLog.open(...) as s:`.
        `initial()` makes a new state (called when there is no snapshot, and again each
        time one is rebuilt: return a fresh object); `apply(state, event)` returns the
        state after `event`, and must be deterministic: replay calls it again on the same
        events. Events are stored with `serializer` (JSON by default), the snapshot with
        `state_serializer` (default: `serializer`). `should_checkpoint` turns true once the
        events after the snapshot reach `checkpoint_bytes` or `checkpoint_records` (None:
        no such limit). `io` is the I/O layer for the log and the snapshot files;
        `options` the log's options (retention is refused: it would drop events that no
        snapshot holds).

        Raises:
            ValueError: an option is out of range, or retention is set.
            CorruptionError: the snapshot is damaged, belongs to another log, or does not
                meet the log (records between them are missing); or the log is damaged.
            LockedError, WalError: as `walasync.open`.
            Whatever `state_serializer.loads` raises for the snapshot, or `serializer.loads`
            for a logged event.
        """
        options = Options() if options is None else options
        if options.retention_bytes is not None or options.retention_age is not None:
            raise ValueError("a StateLog's log cannot have retention: it would drop events")
        _positive_or_none("checkpoint_bytes", checkpoint_bytes)
        _positive_or_none("checkpoint_records", checkpoint_records)
        if not os.fspath(path):
            raise ValueError("a path must not be empty (use '.' for the current directory)")
        where, layer = os.fspath(path), io or FileIO()
        states: Serializer[S] = serializer if state_serializer is None else state_serializer  # type: ignore[assignment]

        async def opening() -> StateLog[S, E]:
            wal = await open_wal(where, io=layer, **asdict(options))
            try:
                state_log = cls(
                    wal,
                    layer,
                    apply,
                    initial,
                    serializer,
                    states,
                    checkpoint_bytes,
                    checkpoint_records,
                )
                await state_log._recover()
            except BaseException:
                await wal.close()
                raise
            return state_log

        return Opener(opening)

    # -- what it holds ------------------------------------------------------------------------

    @property
    def state(self) -> S:
        """The state after every event applied so far."""
        return self._state

    @property
    def last_lsn(self) -> int:
        """LSN of the last applied event (0 if none ever was)."""
        return self._applied

    @property
    def snapshot_lsn(self) -> int:
        """LSN of the last event the snapshot holds (0: there is no snapshot)."""
        return self._snapshot_lsn

    @property
    def should_checkpoint(self) -> bool:
        """True once the events applied after the snapshot reach `checkpoint_bytes` (as
        logged) or `checkpoint_records`: time to call `checkpoint()`."""
        return (self._max_records is not None and self._since_records >= self._max_records) or (
            self._max_bytes is not None and self._since_bytes >= self._max_bytes
        )

    @property
    def path(self) -> str:
        """The directory of the log and the snapshot (absolute)."""
        return self._wal.path

    @property
    def closed(self) -> bool:
        """True once `close()` has begun."""
        return self._closer is not None

    # -- apply --------------------------------------------------------------------------------

    async def apply(self, event: E) -> int:
        """Append `event` and, once it is durable, apply it; return its LSN.

        The state changes only after the append succeeded, in LSN order; concurrent calls
        share batches. If the caller is cancelled once the append is under way, the event
        may still be logged, and then it is applied all the same.

        Raises:
            ApplyError: the event is durable (at `.lsn`) but the apply function raised
                (the cause); it counts as applied, as it will on replay.
            ClosedError, BrokenLogError, DiskFullError, RecordTooLargeError, WrongLoopError:
                as `Wal.append`; nothing was applied.
            Whatever `serializer` raises for `event` (nothing was logged).
        """
        # The loop running on its own thread is the loop: cheaper than `require_loop`,
        # which makes a getpid() system call (the hot path; as `Batcher.put` does).
        if _get_ident() != self._thread or not self._loop.is_running():
            require_loop(self._loop)
        while not self._gate.is_set():
            await self._gate.wait()
        self._check()
        data = self._events.dumps(event)
        if type(data) is not bytes:
            data = bytes(data)
        decoded = self._events.loads(data)  # what replay will apply
        applied: asyncio.Future[int] = self._loop.create_future()
        task = self._loop.create_task(self._wal.append(data))
        self._appends.add(task)
        self._in_flight += 1
        self._idle.clear()
        task.add_done_callback(functools.partial(self._appended, decoded, len(data), applied))
        return await applied

    def _appended(
        self, event: E, size: int, applied: asyncio.Future[int], task: asyncio.Task[int]
    ) -> None:
        """An append ended: register its event for applying, or fail its caller."""
        self._appends.discard(task)
        if task.cancelled():  # only when the loop is torn down under it
            self._in_flight -= 1
            applied.cancel()
            self._settle()
            return
        exc = task.exception()
        if exc is not None:
            self._in_flight -= 1
            if not applied.done():
                applied.set_exception(exc)
            self._settle()
            return
        self._ready[task.result()] = (event, size, applied)
        self._drain()

    def _drain(self) -> None:
        """Apply every registered event that comes next in LSN order."""
        ready = self._ready
        while ready:
            item = ready.pop(self._applied + 1, None)
            if item is None:
                break
            event, size, applied = item
            lsn = self._applied + 1
            error = self._step(event, size)
            self._in_flight -= 1
            if error is None:
                if not applied.done():
                    applied.set_result(lsn)
            elif applied.done():  # its caller was cancelled: nobody else will say it
                _log.warning(
                    "%s: the apply function raised at LSN %d", self.path, lsn, exc_info=error
                )
            else:
                err = ApplyError(lsn, f"LSN {lsn} is logged, but the apply function raised")
                err.__cause__ = error
                applied.set_exception(err)
        self._settle()

    def _step(self, event: E, size: int) -> Exception | None:
        """Apply one event (the next LSN); the function's exception, if it raised."""
        error = None
        try:
            self._state = self._fn(self._state, event)
        except Exception as exc:
            error = exc
        self._applied += 1
        self._since_records += 1
        self._since_bytes += size
        return error

    def _settle(self) -> None:
        if not self._in_flight:
            self._idle.set()

    # -- checkpoint, undo, replay -------------------------------------------------------------

    async def checkpoint(self) -> int:
        """Write the state to the snapshot, then drop the log records it covers; return
        the LSN it covers. Durable when it returns.

        The state is encoded at once, on the loop, as of the last applied event (applies
        go on meanwhile); from then on `state` is that snapshot decoded (a new object),
        exactly what a reopen would load. Does nothing if no event came since the last
        snapshot. Shielded: cancelling the caller does not stop it.

        Raises:
            ClosedError, BrokenLogError, WrongLoopError; WalError (DiskFullError) if the
            snapshot could not be written (the state and the log are as they were);
            whatever `state_serializer` raises (nothing changed).
        """
        require_loop(self._loop)
        self._check()
        return await self._shielded(self._checkpoint())

    async def _checkpoint(self) -> int:
        async with self._lifecycle:
            self._check_failure()  # not `closed`: what was called before close() goes on
            wal = self._wal
            lsn = self._applied
            if lsn > self._snapshot_lsn:
                data = self._states.dumps(self._state)
                if type(data) is not bytes:
                    data = bytes(data)
                self._state = self._states.loads(data)  # what a reopen would load
                records, nbytes = self._since_records, self._since_bytes
                self._floor = max(self._floor, lsn)
                if wal.synced_lsn < lsn:  # relaxed modes: the log must not end before it
                    await wal.sync()
                buffers = encode_snapshot(wal.log_id, lsn, data)
                await self._run(replace_file, self._io, wal.path, SNAPSHOT_NAME, buffers)
                self._snapshot_lsn = lsn
                self._since_records -= records
                self._since_bytes -= nbytes
            if wal.first_lsn <= lsn:
                await wal.truncate_front(lsn + 1)
            return lsn

    async def undo(self) -> E:
        """Remove the last applied event from the log (`truncate_back`) and rebuild the
        state without it (the snapshot, then the events after it); return the event.

        Waits for the `apply` calls in flight and holds new ones until it is done. An
        event a checkpoint already holds cannot be undone. Shielded: cancelling the
        caller does not stop it.

        Raises:
            NothingToUndoError: no event after the latest snapshot (nothing changed).
            BrokenLogError: the log or the rebuild failed (reopen; the event is removed
                if the log's cut was durable), ClosedError, WrongLoopError.
        """
        require_loop(self._loop)
        self._check()
        return await self._shielded(self._undo())

    async def _undo(self) -> E:
        async with self._lifecycle:
            self._check_failure()  # not `closed`: what was called before close() goes on
            self._gate.clear()
            try:
                await self._idle.wait()
                self._check_failure()
                lsn = self._applied
                if lsn <= self._floor:
                    raise NothingToUndoError(
                        f"no event after the snapshot (LSN {self._floor}) to undo"
                        if self._floor
                        else "no event to undo"
                    )
                wal = self._wal
                [record] = [r async for r in wal.read(lsn, lsn)]
                event = self._events.loads(record.data)
                try:
                    await wal.truncate_back(lsn - 1)
                    state, snapshot = await self._load()
                    state, records, nbytes = await self._replay(state, snapshot + 1)
                except BaseException as exc:
                    self._failure = exc
                    raise
                self._state, self._applied = state, lsn - 1
                self._snapshot_lsn = snapshot
                self._since_records, self._since_bytes = records, nbytes
                return event
            finally:
                self._gate.set()

    async def _recover(self) -> None:
        """Load the snapshot, replay the log after it, finish a cut-short checkpoint."""
        wal = self._wal
        state, snapshot = await self._load()
        state, records, nbytes = await self._replay(state, snapshot + 1)
        self._state, self._applied = state, snapshot + records
        self._snapshot_lsn = self._floor = snapshot
        self._since_records, self._since_bytes = records, nbytes
        if wal.first_lsn <= snapshot:  # a checkpoint ended between snapshot and truncation
            await wal.truncate_front(snapshot + 1)

    async def _load(self) -> tuple[S, int]:
        """The snapshot's state and LSN; a new state and 0 if there is no snapshot."""
        wal, path = self._wal, self._snapshot_path
        data = await self._run(_read_snapshot, self._io, wal.path)
        if data is None:
            if wal.first_lsn > 1:
                raise CorruptionError(
                    path,
                    0,
                    f"snapshot missing: the log starts at LSN {wal.first_lsn}, and the events "
                    "before it were only in the snapshot",
                )
            return self._initial(), 0
        log_id, lsn, state = decode_snapshot(path, data)
        if log_id != wal.log_id:
            raise CorruptionError(path, 16, "the snapshot was made from another log")
        if lsn > wal.last_lsn:
            raise CorruptionError(
                path,
                32,
                f"the snapshot holds events up to LSN {lsn}, but the log ends at "
                f"{wal.last_lsn}: acknowledged records are missing",
            )
        if lsn < wal.first_lsn - 1:
            raise CorruptionError(
                path,
                32,
                f"the snapshot holds events up to LSN {lsn}, but the log starts at "
                f"{wal.first_lsn}: the events in between are lost",
            )
        return self._states.loads(state), lsn

    async def _replay(self, state: S, start: int) -> tuple[S, int, int]:
        """Apply the logged events from `start` to the end to `state`; return the state,
        how many events, and their bytes."""
        records = nbytes = 0
        fn, loads = self._fn, self._events.loads
        async for record in self._wal.read(start):
            try:
                state = fn(state, loads(record.data))
            except Exception:
                _log.warning(
                    "%s: replaying LSN %d, the apply function raised (as it did when the event "
                    "was applied); the event counts as applied",
                    self.path,
                    record.lsn,
                    exc_info=True,
                )
            records += 1
            nbytes += len(record.data)
        return state, records, nbytes

    # -- plumbing -----------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., R], *args: Any) -> R:
        """Run a blocking file operation on the loop's default executor, OSError mapped."""
        try:
            return await self._loop.run_in_executor(None, fn, *args)
        except OSError as exc:
            raise map_os_error(exc, f"snapshot of {self.path}") from exc

    async def _shielded(self, work: Coroutine[Any, Any, R]) -> R:
        """Run `work` in a task that cancelling the caller does not stop."""
        task = self._loop.create_task(work)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
        return await asyncio.shield(task)

    def _check(self) -> None:
        self._check_failure()
        if self._closer is not None:
            raise ClosedError("the state log is closed")

    def _check_failure(self) -> None:
        if self._failure is not None:
            err = BrokenLogError(
                "the state could not be rebuilt after an undo; reopen the StateLog "
                f"(cause: {self._failure!r})"
            )
            err.__cause__ = self._failure
            raise err

    async def close(self) -> None:
        """Let the `apply` calls in flight and a running checkpoint or undo finish, then
        close the log. Idempotent; shielded against cancellation."""
        require_loop(self._loop)
        if self._closer is None:
            self._closer = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closer)

    async def _close(self) -> None:
        try:
            await self._idle.wait()
            async with self._lifecycle:
                pass
        finally:
            try:
                await self._wal.close()
            finally:
                self._closed = True

    async def __aenter__(self) -> StateLog[S, E]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        if self._closed:
            status = "closed"
        elif self._closer is not None:
            status = "closing"
        else:
            status = "broken" if self._failure is not None else "open"
        return (
            f"<StateLog {self.path!r} {status} last_lsn={self._applied} "
            f"snapshot_lsn={self._snapshot_lsn} in_flight={self._in_flight} "
            f"since_snapshot={self._since_records} records/{self._since_bytes} bytes>"
        )
