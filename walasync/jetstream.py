"""Replicate a log to a NATS JetStream stream, and rebuild a log from one.

    pip install 'walasync[nats]'

    async with walasync.open("data/orders") as wal:
        async with Replicator(wal, "nats://10.0.0.1:4222", stream="ORDERS") as rep:
            lsn = await rep.append(b"order 17 filled")  # on this disk and on a quorum
    ...
    await restore("nats://10.0.0.1:4222", "ORDERS", "data/orders-replica")

Theory of operation. The stream is the log's alone: one subject, one writer. A `Replicator`
follows the local log (`Wal.read_batches(follow=True)`: durable records only, batch by
batch with their unit boundaries) and packs whole `append_many` units into messages, each
one walasync batch frame (the on-disk encoding: LSN, count, record lengths with unit marks,
CRC32C keyed by the log's identity). Up to `window` messages are in flight at once. Every
message carries `Nats-Expected-Last-Sequence`, the stream sequence of the message before
it, so the stream stores a message only directly after its predecessor: the stream is
always a gap-free prefix of the log, in order, whatever is lost, retried or reordered on
the way (by induction: a message with expected sequence s is built as the continuation of
the message at s). Every message also carries a `Nats-Msg-Id` made of the log's identity
and its LSN range, so a retried message that was already stored is dropped by the stream's
duplicate window and answered as a duplicate instead of failing.

Any failure (a timed-out or refused publish, a lost connection, a leader change) ends the
shipping session: the replicator asks the stream for its last message (its headers name
the log, its LSN range and the log's `cuts` when its records were read), checks that it
matches the local log (`_check_history`: O(1) unless the log was cut back since), and
ships again from the next LSN, resending first the unacknowledged messages it still holds
(same bytes, same Msg-Ids). Acknowledgements therefore come in order, and `acked_lsn` is
the highest LSN the stream holds: on an R3 stream, a quorum of servers.

A follower (`Follower`, `restore`) reads the stream from where its own log ends, checks
each message (identity, frame checksum, LSN continuity: a gap or a repeat is an error) and
appends each message's records as one `append_many` unit, so the replica's LSNs are the
source's.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import nats
import nats.errors
import nats.js.errors
from crc32c import crc32c
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from . import _format as fmt
from ._open import open as open_wal
from ._reader import Batch
from ._readonly import ReadOnlyWal
from ._store import SegmentInfo
from ._wal import Buffer, DropHook, Wal
from .errors import BrokenLogError, ClosedError, TruncatedError, WalError

__all__ = (
    "AuthError",
    "ConnectError",
    "Follower",
    "MessageTooLargeError",
    "NotReplicatedError",
    "ReplicationError",
    "ReplicationGapError",
    "Replicator",
    "StreamConfigError",
    "StreamContentError",
    "StreamNotFoundError",
    "decode_message",
    "restore",
)

_log = logging.getLogger("walasync.jetstream")

HEADER_LOG = "Walasync-Log"  # the source log's identity, 32 hex digits
HEADER_LSN = "Walasync-Lsn"  # "first-last", the LSNs the message holds
HEADER_CUTS = "Walasync-Cuts"  # the source log's `cuts` when its records were read
HEADER_RESERVE = 512  # bytes of a message's max_payload kept for its headers
_WRONG_LAST_SEQUENCE = 10071
_MAX_BACKOFF = 2.0


class ReplicationError(WalError):
    """Base class of the errors of replication to JetStream."""


class ConnectError(ReplicationError):
    """No NATS server could be reached, or the connection given was closed."""


class AuthError(ConnectError):
    """The NATS server refused the credentials (authentication or authorization)."""


class StreamNotFoundError(ReplicationError):
    """The stream does not exist (and was not to be created)."""


class StreamConfigError(ReplicationError):
    """The stream's settings do not allow safe replication (subjects other than the log's,
    memory storage, fewer replicas than asked, a duplicate window shorter than the retry
    policy needs, a message size limit below the log's records, ...)."""


class StreamContentError(ReplicationError):
    """The stream holds what is not this log's continuation: messages that are not
    walasync's, another log's, a gap or a repeat in LSNs, a bad checksum, records that
    differ from the local log's, or more records than the local log has."""


class MessageTooLargeError(ReplicationError):
    """A record (or `append_many` unit) does not fit in one message under the server's
    `max_payload`; open the log with a smaller `max_record_size`, or raise `max_payload`."""


class ReplicationGapError(ReplicationError):
    """The local log no longer holds records the stream does not have yet (truncated or
    cut before they were shipped): the stream cannot continue without a gap."""


class NotReplicatedError(ReplicationError):
    """`Replicator.truncate_front` would remove records the stream has not acknowledged."""


for _cls in (
    ReplicationError,
    ConnectError,
    AuthError,
    StreamNotFoundError,
    StreamConfigError,
    StreamContentError,
    MessageTooLargeError,
    ReplicationGapError,
    NotReplicatedError,
):
    _cls.__module__ = "walasync.jetstream"

_FATAL = (
    StreamNotFoundError,
    StreamConfigError,
    StreamContentError,
    MessageTooLargeError,
    ReplicationGapError,
    BrokenLogError,
)


def _salt(log_id: bytes) -> int:
    """The frame checksum's key: a message validates only under its own log's identity."""
    return crc32c(log_id)


def _encode(log_id: bytes, first: int, records: Sequence[bytes], joined: Sequence[int]) -> bytes:
    head, body = fmt.encode_batch(first, records, _salt(log_id), joined)
    return head + body


@dataclass(frozen=True)
class Message:
    """One decoded message: the source log, the LSN of its first record, its records and
    where their units go on (as `walasync.Batch.joined`)."""

    log_id: bytes
    lsn: int
    records: list[bytes]
    joined: tuple[int, ...]
    cuts: int | None = None
    """The source's `Wal.cuts` when the records were read (None: a message of an earlier
    walasync, without the header)."""

    @property
    def last_lsn(self) -> int:
        return self.lsn + len(self.records) - 1


def decode_message(headers: dict[str, str] | None, data: bytes | None) -> Message:
    """Check and decode one message of a replicated stream.

    Raises:
        StreamContentError: it is not a walasync message, or its headers and its frame
            disagree, or its checksum fails.
    """
    headers = headers or {}
    try:
        log_id = bytes.fromhex(headers[HEADER_LOG])
        first, last = (int(x) for x in headers[HEADER_LSN].split("-"))
        cuts = int(headers[HEADER_CUTS]) if HEADER_CUTS in headers else None
    except (KeyError, ValueError):
        raise StreamContentError(
            f"a message without walasync's headers ({HEADER_LOG}, {HEADER_LSN}): the stream "
            "holds messages that are not a walasync log's"
        ) from None
    data = data or b""
    head = fmt.parse_batch_header(data) if len(data) >= fmt.BATCH_HEADER else None
    end = fmt.BATCH_HEADER + (head.length if head is not None else 0)
    if (
        head is None
        or len(data) < end
        or head.first_lsn != first
        or head.nrecords != last - first + 1
        or not fmt.check_batch(head, memoryview(data)[fmt.BATCH_HEADER : end], _salt(log_id))
    ):
        raise StreamContentError(f"message {first}-{last}: bad frame or checksum")
    payload = data[fmt.BATCH_HEADER : end]
    try:
        records = fmt.decode_records(head, payload)
    except fmt.FormatError as exc:
        raise StreamContentError(f"message {first}-{last}: {exc}") from None
    return Message(log_id, first, records, tuple(fmt.joined_records(head, payload)), cuts)


class _Connection:
    """A NATS connection: the caller's, or one this module opens (and opens again when it
    closes: it is made without nats-py's reconnection, so a lost server ends a session and
    the next session starts from what the stream holds)."""

    def __init__(self, target: NATS | str | Sequence[str], options: dict[str, Any]) -> None:
        self._given: NATS | None = None
        self._servers: list[str] = []
        if isinstance(target, NATS):
            self._given = target
        elif isinstance(target, str):
            self._servers = [target]
        else:
            self._servers = list(target)
        self._options = options
        self.nc: NATS | None = self._given

    async def get(self) -> NATS:
        """The open connection, connecting if needed.

        Raises:
            ConnectError, AuthError.
        """
        nc = self.nc
        if nc is not None and not nc.is_closed:
            return nc
        if self._given is not None:
            raise ConnectError("the NATS connection given to walasync is closed")
        options = {
            "connect_timeout": 2,
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.2,
            **self._options,
            "allow_reconnect": False,
        }

        async def quiet(exc: Exception) -> None:
            _log.debug("NATS: %r", exc)

        options.setdefault("error_cb", quiet)
        nc = NATS()
        try:
            await nc.connect(self._servers, **options)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await nc.close()  # a failed connect may leave its socket open
            if isinstance(exc, nats.errors.AuthorizationError) or (
                isinstance(exc, nats.errors.Error) and "authorization" in str(exc).lower()
            ):
                raise AuthError(f"NATS refused the credentials: {exc}") from exc
            if isinstance(exc, (OSError, asyncio.TimeoutError, nats.errors.Error)):
                raise ConnectError(f"no NATS server reachable at {self._servers}: {exc!r}") from exc
            raise
        self.nc = nc
        return nc

    async def close(self) -> None:
        if self._given is None and self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        self.nc = None


async def _stream_info(js: JetStreamContext, stream: str) -> api.StreamInfo:
    try:
        return await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        raise StreamNotFoundError(f"stream {stream!r} does not exist") from None


async def _message_at(
    js: JetStreamContext, stream: str, subject: str, seq: int
) -> tuple[int, Message] | None:
    """The first message at or after stream sequence `seq`, with its sequence."""
    try:
        raw = await js.get_msg(stream, seq, subject=subject, next=True)
    except nats.js.errors.NotFoundError:
        return None
    assert raw.seq is not None
    return raw.seq, decode_message(raw.headers, raw.data)


async def _find(
    js: JetStreamContext, stream: str, subject: str, state: api.StreamState, lsn: int
) -> tuple[int, Message] | None:
    """The first message whose last LSN is at least `lsn` (a binary search over stream
    sequences: messages are in LSN order), or None if every message ends before it."""
    lo, hi, found = state.first_seq, state.last_seq, None
    while lo <= hi:
        mid = (lo + hi) // 2
        at = await _message_at(js, stream, subject, mid)
        if at is None:
            hi = mid - 1
        elif at[1].last_lsn >= lsn:
            found, hi = at, mid - 1
        else:
            lo = at[0] + 1
    return found


async def _first_lsn(js: JetStreamContext, stream: str, subject: str) -> int | None:
    """The LSN of the stream's first record (None if it is empty)."""
    state = (await _stream_info(js, stream)).state
    if state.messages == 0:
        return None
    at = await _message_at(js, stream, subject, state.first_seq)
    return None if at is None else at[1].lsn


@dataclass
class _Outgoing:
    """A message built and maybe sent, until the stream acknowledges it."""

    first: int
    last: int
    payload: bytes
    msg_id: str
    cuts: int  # the local log's `cuts` its records were read under
    expected: int = 0  # the stream sequence it must follow
    fut: asyncio.Future[bytes] | None = None
    deadline: float = 0.0


class Replicator:
    """Ships a local log to a JetStream stream, and tells when records are replicated.

    `wal` is the log, open in this process: its writer's `Wal`, or a `ReadOnlyWal` opened
    with `durable_only=True` (a shipper beside a writer in another process: it cannot
    append, and cannot guard the writer's retention).

    `nats` is a connected `nats.aio.client.Client` (the caller keeps it: options, auth and
    reconnection are theirs) or server URLs (this replicator connects, with `connect_options`
    passed to `nats.connect`, and reconnects after any loss). Start it with `await start()`
    or `async with`. It checks the stream (creating it when `create=True`: file storage,
    `replicas`, `max_bytes`, `max_age`, `duplicate_window`), finds the last LSN the stream
    holds, and ships from the next one, in the background, until `close()`. Transient
    failures (timeouts, lost servers, no quorum) are retried with backoff for ever and shown
    in `error`; a failure that retrying cannot cure stops it (`failure`; `wait` raises it).

    While it runs it keeps retention from dropping a segment whose records the stream has
    not acknowledged (it chains itself before the log's `on_segment_drop`), unless
    `guard_retention=False`.

    `resume_from` is the operator's answer when the stream holds nothing to resume from:
    emptied by its limits (`max_age`, `max_bytes`) or purged, it no longer says where the
    log continues. Give the LSN after the last one it held (a caught-up follower's
    `last_lsn + 1`); from `wal.first_lsn` to the local log's last durable LSN + 1. It is
    ignored when the stream has messages (they tell), and once this replicator has seen
    the stream (it then knows where its own last acknowledged message ended).
    """

    def __init__(
        self,
        wal: Wal | ReadOnlyWal,
        nats: NATS | str | Sequence[str],
        *,
        stream: str,
        subject: str | None = None,
        create: bool = False,
        replicas: int = 3,
        max_bytes: int | None = None,
        max_age: float | None = None,
        duplicate_window: float = 120.0,
        window: int = 16,
        pack_bytes: int = 256 << 10,
        ack_timeout: float = 5.0,
        guard_retention: bool = True,
        connect_options: dict[str, Any] | None = None,
        resume_from: int | None = None,
    ) -> None:
        if isinstance(wal, ReadOnlyWal) and not wal.durable_only:
            raise ValueError(
                "a read-only log is shipped only if opened with durable_only=True: else a "
                "power loss could take back records the stream already holds"
            )
        if window < 1 or pack_bytes < 1 or ack_timeout <= 0 or replicas < 1:
            raise ValueError("window, pack_bytes, replicas must be >= 1 and ack_timeout > 0")
        if resume_from is not None and resume_from < 1:
            raise ValueError(f"resume_from must be an LSN (>= 1), not {resume_from}")
        if duplicate_window < 2 * ack_timeout:
            raise ValueError(
                f"duplicate_window ({duplicate_window} s) must be at least twice ack_timeout "
                f"({ack_timeout} s): a resent message must fall inside it"
            )
        self.wal = wal
        self.stream = stream
        self.subject = subject or f"walasync.{stream}"
        self._create = create
        self._replicas = replicas
        self._max_bytes = max_bytes
        self._max_age = max_age
        self._dup_window = duplicate_window
        self._window = window
        self._pack = pack_bytes
        self._ack_timeout = ack_timeout
        self._guard = guard_retention
        self._resume_from = resume_from
        # The stream sequence of the last message known to be ours, and its last LSN: an
        # emptied stream whose last sequence is still that one continues after that LSN.
        self._known: tuple[int, int] | None = None
        self._cuts = 0  # the local log's `cuts` when the stream was last checked
        self._conn = _Connection(nats, connect_options or {})
        self._log_id = wal.log_id
        self._log_hex = self._log_id.hex()
        self._salt = _salt(self._log_id)
        self._limit = 0  # the largest message payload, from the server's max_payload
        self.acked_lsn = 0
        """The highest LSN the stream has acknowledged (with every one before it)."""
        self.error: BaseException | None = None
        """The last transient failure (None once shipping works again)."""
        self.failure: BaseException | None = None
        """What stopped the replicator for good, if anything did."""
        self._retry: deque[_Outgoing] = deque()  # unacknowledged messages of the last session
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._ids = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._prev_hook: DropHook | None = None
        self._closed = False
        self.sent_messages = 0
        self.resyncs = 0

    # -- public surface -------------------------------------------------------------

    @property
    def lag(self) -> int:
        """Records durable locally that the stream has not acknowledged yet."""
        return max(0, self._synced_lsn - self.acked_lsn)

    @property
    def _synced_lsn(self) -> int:
        """The highest LSN durable locally: a read-only log stops at what is durable."""
        return self.wal.synced_lsn if isinstance(self.wal, Wal) else self.wal.last_lsn

    def _writer(self) -> Wal:
        if not isinstance(self.wal, Wal):
            raise TypeError("a replicator of a read-only log cannot append or truncate")
        return self.wal

    async def start(self) -> None:
        """Connect, check (or create) the stream, find where it ends, and start shipping.

        Raises:
            ConnectError, AuthError: no server reachable, or the credentials refused.
            StreamNotFoundError, StreamConfigError: the stream is missing or unsuitable.
            StreamContentError: the stream holds what is not this log's prefix.
            ReplicationGapError: the local log no longer has the records that come next.
            MessageTooLargeError: the log accepts records larger than a message can be.
        """
        if self._task is not None:
            return
        nc = await self._conn.get()
        try:
            await self._position(nc)
        except BaseException:
            await self._conn.close()
            raise
        if self._guard and isinstance(self.wal, Wal):
            self._prev_hook = self.wal.on_segment_drop
            self.wal.on_segment_drop = self._guard_drop
        self._task = asyncio.ensure_future(self._supervise())

    async def close(self) -> None:
        """Stop shipping (what is in flight may or may not be stored: the next start finds
        out), give the log its own retention hook back, and close a connection this
        replicator opened. Waiters in `wait` get `ClosedError`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        if isinstance(self.wal, Wal) and self.wal.on_segment_drop == self._guard_drop:
            self.wal.on_segment_drop = self._prev_hook
        self._fail_waiters(ClosedError("the replicator is closed"))
        await self._conn.close()

    async def __aenter__(self) -> Replicator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait(self, lsn: int) -> None:
        """Return once the stream has acknowledged every record up to `lsn` (on an R3
        stream: a quorum of servers holds them).

        Raises:
            ClosedError: the replicator was closed first.
            ReplicationError, BrokenLogError: what stopped the replicator for good.
        """
        if lsn <= self.acked_lsn:
            return
        if self.failure is not None:
            raise self.failure
        if self._closed:
            raise ClosedError("the replicator is closed")
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (lsn, next(self._ids), fut))
        await fut

    async def append(self, data: Buffer) -> int:
        """Append one record and return its LSN once it is durable locally and acknowledged
        by the stream. Raises as `Wal.append` and `wait` do."""
        lsn = await self._writer().append(data)
        await self.wait(lsn)
        return lsn

    async def append_many(self, records: Iterable[Buffer]) -> range:
        """`Wal.append_many`, returning once the stream acknowledged the whole unit."""
        lsns = await self._writer().append_many(records)
        if lsns:
            await self.wait(lsns[-1])
        return lsns

    async def flush(self) -> None:
        """Return once everything durable in the local log when called is acknowledged."""
        await self.wait(self._synced_lsn)

    async def truncate_front(self, lsn: int, *, force: bool = False) -> None:
        """`Wal.truncate_front(lsn)`, refused while the stream lacks records below `lsn`.

        Raises:
            NotReplicatedError: records below `lsn` are not acknowledged yet (unless
                `force`: then they go, and the replicator stops with `ReplicationGapError`
                if it had not shipped them).
        """
        wal = self._writer()
        if lsn - 1 > self.acked_lsn and not force:
            raise NotReplicatedError(
                f"truncate_front({lsn}) would remove records up to {lsn - 1}; the stream has "
                f"acknowledged up to {self.acked_lsn}"
            )
        await wal.truncate_front(lsn)

    def __repr__(self) -> str:
        state = "failed" if self.failure else "closed" if self._closed else "running"
        return (
            f"<Replicator {self.stream!r} {state} acked_lsn={self.acked_lsn} lag={self.lag} "
            f"in_retry={len(self._retry)} error={self.error!r}>"
        )

    # -- retention --------------------------------------------------------------------

    async def _guard_drop(self, segment: SegmentInfo) -> bool | None:
        """Keep a segment the stream has not acknowledged all of; else ask the log's own
        hook, if it had one."""
        if segment.last_lsn > self.acked_lsn:
            _log.debug("kept %s: replicated up to %d only", segment.path, self.acked_lsn)
            return False
        if self._prev_hook is not None:
            return await self._prev_hook(segment)
        return None

    # -- acknowledgements ----------------------------------------------------------------

    def _advance(self, lsn: int) -> None:
        if lsn <= self.acked_lsn:
            return
        self.acked_lsn = lsn
        waiters = self._waiters
        while waiters and waiters[0][0] <= lsn:
            fut = heapq.heappop(waiters)[2]
            if not fut.done():
                fut.set_result(None)

    def _fail_waiters(self, exc: BaseException) -> None:
        waiters, self._waiters = self._waiters, []
        for _, _, fut in waiters:
            if not fut.done():
                fut.set_exception(exc)

    # -- finding where the stream ends ----------------------------------------------------

    async def _position(self, nc: NATS) -> int:
        """Check the stream and find the next LSN to ship; returns the stream's last
        sequence. Drops from the retry queue what the stream already holds, and all of it
        if the local log was cut back since it was read."""
        # Read first: a cut from now on is seen before the next publish (`_session`).
        cuts = self.wal.cuts
        js = nc.jetstream(timeout=self._ack_timeout)
        self._limit = nc.max_payload - HEADER_RESERVE
        # A read-only log's writer's limit is unknown: a unit too large fails when it comes.
        largest = self.wal.options.max_record_size if isinstance(self.wal, Wal) else 0
        if fmt.BATCH_HEADER + 8 + 4 + largest > self._limit:
            raise MessageTooLargeError(
                f"the log accepts records of up to {largest} bytes, "
                f"but the server's max_payload ({nc.max_payload}) allows messages of "
                f"{self._limit - fmt.BATCH_HEADER - 12} bytes of record: open the log with a "
                "smaller max_record_size or raise max_payload"
            )
        info = await self._stream(js)
        state = info.state
        last: int | None = None
        resume_from = None
        if state.messages == 0:
            if self._known is not None and self._known[0] == state.last_seq:
                # Emptied since our last acknowledged message, and nothing stored since.
                last = self._known[1]
            elif self._resume_from is not None and self._known is None:
                resume_from = last = self._resume_from - 1
                if last > self._synced_lsn:
                    raise ValueError(
                        f"resume_from={self._resume_from} is beyond the local log, whose "
                        f"last durable LSN is {self._synced_lsn}"
                    )
            elif state.last_seq != 0:
                raise StreamContentError(
                    f"stream {self.stream!r} is empty but held {state.last_seq} messages "
                    "(purged, or aged out by its limits): where the log continues is unknown; "
                    "pass resume_from=<the LSN after the last one it held> "
                    "(walasync replicate --resume-from)"
                )
        else:
            at = await _message_at(js, self.stream, self.subject, state.last_seq)
            if at is None or at[0] != state.last_seq:
                raise StreamContentError(
                    f"stream {self.stream!r}: its last message is not on {self.subject!r}"
                )
            msg = at[1]
            if msg.log_id != self._log_id:
                raise StreamContentError(
                    f"stream {self.stream!r} holds another log's records "
                    f"(log {msg.log_id.hex()}, not {self._log_hex})"
                )
            await self._check_history(js, state, msg, cuts)
            last = msg.last_lsn
            ignored = self._resume_from is not None and self._known is None
            if ignored and last + 1 != self._resume_from:
                _log.warning(
                    "stream %s holds records up to %d: resume_from=%d ignored",
                    self.stream,
                    last,
                    self._resume_from,
                )
        start = self.wal.first_lsn if last is None else last + 1
        while self._retry and self._retry[0].last < start:
            self._retry.popleft()
        if self._retry and (
            self._retry[0].first != start or any(o.cuts != cuts for o in self._retry)
        ):
            self._retry.clear()
        if resume_from is not None and start < self.wal.first_lsn:
            raise ReplicationGapError(
                f"resume_from={start} is below the local log's first LSN "
                f"({self.wal.first_lsn}): records {start}..{self.wal.first_lsn - 1} are gone"
            )
        if start < self.wal.first_lsn:
            raise ReplicationGapError(
                f"the stream holds records up to {start - 1}, but the local log starts at "
                f"{self.wal.first_lsn}: records {start}..{self.wal.first_lsn - 1} were "
                "removed before they were shipped"
            )
        self._seq = state.last_seq
        self._start = start
        self._cuts = cuts
        self._known = (state.last_seq, start - 1)
        self._advance(start - 1)
        return state.last_seq

    async def _stream(self, js: JetStreamContext) -> api.StreamInfo:
        """The stream's info, creating the stream if asked; its settings checked."""
        try:
            info = await _stream_info(js, self.stream)
        except StreamNotFoundError:
            if not self._create:
                raise
            config = api.StreamConfig(
                name=self.stream,
                subjects=[self.subject],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                num_replicas=self._replicas,
                max_bytes=self._max_bytes if self._max_bytes is not None else -1,
                max_age=self._max_age or 0.0,
                duplicate_window=self._dup_window,
                discard=api.DiscardPolicy.OLD,
            )
            try:
                info = await js.add_stream(config)
            except nats.js.errors.APIError as exc:  # created meanwhile, or refused
                try:
                    info = await _stream_info(js, self.stream)
                except StreamNotFoundError:
                    raise StreamConfigError(
                        f"stream {self.stream!r} could not be created: {exc.description}"
                    ) from exc
        self._check_config(info.config)
        return info

    def _check_config(self, config: api.StreamConfig) -> None:
        problems = []
        if list(config.subjects or ()) != [self.subject]:
            problems.append(f"subjects are {config.subjects}, not only [{self.subject!r}]")
        if config.retention not in (None, api.RetentionPolicy.LIMITS):
            problems.append(f"retention is {config.retention}, not limits")
        if config.storage not in (None, api.StorageType.FILE):
            problems.append(f"storage is {config.storage}, not file")
        if (config.num_replicas or 1) < self._replicas:
            problems.append(f"{config.num_replicas} replicas, fewer than {self._replicas}")
        window = config.duplicate_window or 0
        if window < 2 * self._ack_timeout:
            problems.append(
                f"duplicate window {window} s is under twice ack_timeout ({self._ack_timeout} s)"
            )
        if config.max_msg_size not in (None, -1) and (config.max_msg_size or 0) < self._limit:
            problems.append(f"max_msg_size {config.max_msg_size} is under {self._limit}")
        if config.no_ack:
            problems.append("no_ack is set")
        if config.sealed:
            problems.append("it is sealed")
        if problems:
            raise StreamConfigError(f"stream {self.stream!r}: " + "; ".join(problems))

    async def _check_history(
        self, js: JetStreamContext, state: api.StreamState, msg: Message, cuts: int
    ) -> None:
        """The stream must hold the local log's records where both have them: else it is
        another history of the same log (cut back with `truncate_back` and rewritten).

        Only a cut changes records at LSNs a log had, and each message carries the log's
        `cuts` when its records were read; messages are shipped in order, each checked
        against the log when it was read. So if the log's `cuts` is what the stream's last
        message says (or 0), the stream is a prefix of the log: O(1). After one cut, the
        records from `last_cut` on may differ: those are compared; after several (or
        under an unlabelled message), every record both hold. The last message is always
        compared (a copy of the log's directory that went its own way has the same
        identity and cut count)."""
        lo = max(msg.lsn, self.wal.first_lsn)
        if msg.last_lsn > self._synced_lsn:
            raise StreamContentError(
                f"stream {self.stream!r} holds records up to {msg.last_lsn}, but the local log "
                f"has durable records up to {self._synced_lsn} only"
            )
        if lo > msg.last_lsn:
            return
        await self._compare(msg, lo, msg.last_lsn)
        if cuts == 0 or msg.cuts == cuts:
            return
        since = self.wal.last_cut if msg.cuts == cuts - 1 else 0
        lo = max(since, self.wal.first_lsn)
        at = await _find(js, self.stream, self.subject, state, lo) if lo < msg.lsn else None
        while at is not None and at[1].lsn < msg.lsn:
            await self._compare(at[1], max(lo, at[1].lsn), at[1].last_lsn)
            at = await _message_at(js, self.stream, self.subject, at[0] + 1)

    async def _compare(self, msg: Message, lo: int, hi: int) -> None:
        """The records `lo`..`hi` of `msg` must be the local log's."""
        if lo > hi:
            return
        local = [rec.data async for rec in self.wal.read(lo, hi)]
        if local != msg.records[lo - msg.lsn : hi - msg.lsn + 1]:
            raise StreamContentError(
                f"stream {self.stream!r}: records {lo}..{hi} differ from the local log's "
                "(it was cut back with truncate_back and rewritten after they were shipped)"
            )

    # -- shipping ----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = 0.05
        first = True
        while True:
            try:
                if not first:
                    self.resyncs += 1
                    await self._position(await self._conn.get())
                first = False
                await self._session()
                return  # the local log was closed and everything read was acknowledged
            except asyncio.CancelledError:  # noqa: PERF203 - a session per loop pass
                raise
            except _FATAL as exc:
                self._stop(exc)
                return
            except ClosedError as exc:
                self._stop(exc)
                return
            except TruncatedError as exc:
                gap = ReplicationGapError(f"the local log removed unshipped records: {exc}")
                gap.__cause__ = exc
                self._stop(gap)
                return
            except Exception as exc:
                self.error = exc
                _log.info("replication to %s: %r; resuming", self.stream, exc)
                if isinstance(exc, ConnectError) or self._conn.nc is None:
                    await self._conn.close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                if self.acked_lsn > self._progress:
                    backoff = 0.05

    def _stop(self, exc: BaseException) -> None:
        self.failure = exc
        _log.error("replication to %s stopped: %r", self.stream, exc)
        self._fail_waiters(exc)

    _progress = 0
    _seq = 0
    _start = 1

    async def _session(self) -> None:
        """Ship from `_start` (resending the retry queue first) until a failure."""
        nc = await self._conn.get()
        loop = asyncio.get_running_loop()
        self._progress = self.acked_lsn
        inbox = nc.new_inbox()
        pending: dict[str, asyncio.Future[bytes]] = {}

        async def on_reply(msg: Msg) -> None:
            fut = pending.pop(msg.subject[len(inbox) + 1 :], None)
            if fut is not None and not fut.done():
                if not msg.data and msg.headers and msg.headers.get("Status"):
                    fut.set_exception(_PublishError(f"status {msg.headers.get('Status')}"))
                else:
                    fut.set_result(msg.data)

        sub = await nc.subscribe(inbox + ".*", cb=on_reply)
        buf: deque[tuple[Batch, int]] = deque()
        window: deque[_Outgoing] = deque()
        retry, self._retry = self._retry, deque()
        wake: asyncio.Future[None] = loop.create_future()
        state = {"bytes": 0}
        room = asyncio.Event()
        room.set()

        def poke() -> None:
            nonlocal wake
            if not wake.done():
                wake.set_result(None)

        async def read(start: int) -> None:
            try:
                async for batch in self.wal.read_batches(start, follow=True):
                    size = sum(map(len, batch.records)) + 4 * len(batch.records)
                    buf.append((batch, size))
                    state["bytes"] += size
                    poke()
                    if state["bytes"] >= 4 * self._pack:
                        room.clear()
                        await room.wait()
            finally:
                poke()

        reader = asyncio.ensure_future(read(retry[-1].last + 1 if retry else self._start))
        token = itertools.count()
        seq = self._seq
        try:
            while True:
                while len(window) < self._window and (retry or buf):
                    if self.wal.cuts != self._cuts:
                        # Cut back since the stream was checked: what was read may be gone
                        # (a cut below where this session started is seen only here).
                        raise _PublishError("the local log was cut back: checking the stream")
                    out = retry.popleft() if retry else self._next_message(buf, state)
                    if state["bytes"] < 4 * self._pack:
                        room.set()
                    out.expected = seq
                    seq += 1
                    tok = str(next(token))
                    out.fut = pending[tok] = loop.create_future()
                    out.fut.add_done_callback(lambda _f: poke())
                    out.deadline = loop.time() + self._ack_timeout
                    await nc.publish(
                        self.subject,
                        out.payload,
                        reply=f"{inbox}.{tok}",
                        headers={
                            "Nats-Msg-Id": out.msg_id,
                            "Nats-Expected-Stream": self.stream,
                            "Nats-Expected-Last-Sequence": str(out.expected),
                            HEADER_LOG: self._log_hex,
                            HEADER_LSN: f"{out.first}-{out.last}",
                            HEADER_CUTS: str(out.cuts),
                        },
                    )
                    self.sent_messages += 1
                    window.append(out)
                while window and window[0].fut is not None and window[0].fut.done():
                    out = window.popleft()
                    assert out.fut is not None
                    self._acked(out, out.fut.result())
                    self.error = None
                if reader.done():
                    try:
                        reader.result()  # raises what stopped the reader
                    except TruncatedError as exc:
                        if self.wal.cuts == self._cuts:
                            raise  # truncate_front: records gone before they were shipped
                        raise _PublishError(f"the local log was cut back: {exc}") from exc
                    if not window and not buf and not retry:
                        return  # the log was closed, and everything read is acknowledged
                if window or not (buf or retry):
                    timeout = window[0].deadline - loop.time() if window else None
                    if timeout is not None and timeout <= 0:
                        raise _PublishError(
                            f"no acknowledgement for {window[0].first}-{window[0].last} "
                            f"in {self._ack_timeout} s"
                        )
                    wake = loop.create_future()
                    if not (window and window[0].fut is not None and window[0].fut.done()):
                        await asyncio.wait([wake], timeout=timeout)
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            self._retry = deque(o for o in window if o.fut is None or not _ok(o.fut))
            self._retry.extend(retry)
            for fut in pending.values():
                fut.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _acked(self, out: _Outgoing, reply: bytes) -> None:
        """Handle the stream's answer to `out` (the oldest message in flight)."""
        try:
            resp = json.loads(reply)
        except ValueError:
            raise _PublishError(f"unreadable acknowledgement {reply[:100]!r}") from None
        error = resp.get("error")
        if error:
            if error.get("err_code") == _WRONG_LAST_SEQUENCE:
                raise _PublishError(f"{out.first}-{out.last}: {error.get('description')}")
            if error.get("code") == 404:
                raise StreamNotFoundError(f"stream {self.stream!r}: {error.get('description')}")
            raise _PublishError(f"{out.first}-{out.last}: {error}")
        if resp.get("seq") != out.expected + 1:
            raise _PublishError(
                f"{out.first}-{out.last} stored at sequence {resp.get('seq')}, "
                f"expected {out.expected + 1}"
            )
        self._known = (out.expected + 1, out.last)
        self._advance(out.last)

    def _next_message(self, buf: deque[tuple[Batch, int]], state: dict[str, int]) -> _Outgoing:
        """Pack whole units from the front of `buf` into one message of up to `pack_bytes`,
        splitting a batch between units where needed (a larger unit goes alone, if it fits
        under max_payload)."""
        records: list[bytes] = []
        joined: list[int] = []
        first = buf[0][0].lsn
        size = fmt.BATCH_HEADER + 8
        while buf:
            batch, bsize = buf[0]
            if size + bsize <= self._pack:
                buf.popleft()
                state["bytes"] -= bsize
                joined.extend(i + len(records) for i in batch.joined)
                records.extend(batch.records)
                size += bsize
                continue
            # Split the batch after the last whole unit that fits (at least one unit).
            cut, used, ends = 0, size, set(batch.joined)
            take = 0
            for i, rec in enumerate(batch.records):
                used += len(rec) + 4
                if (used > self._pack and (records or take)) or used > self._limit:
                    break
                if i not in ends:
                    take = i + 1
                    cut = used - size
            if take == 0:
                if records:
                    break
                raise MessageTooLargeError(
                    f"the unit at LSN {batch.lsn} does not fit in one message "
                    f"(max_payload allows {self._limit} bytes)"
                )
            if take == len(batch.records):  # one unit, larger than pack_bytes: alone
                buf.popleft()
                state["bytes"] -= bsize
                joined.extend(i + len(records) for i in batch.joined)
                records.extend(batch.records)
                break
            buf[0] = (
                Batch(
                    batch.lsn + take,
                    batch.records[take:],
                    tuple(i - take for i in batch.joined if i >= take),
                ),
                bsize - cut,
            )
            state["bytes"] -= cut
            joined.extend(i + len(records) for i in batch.joined if i < take)
            records.extend(batch.records[:take])
            break
        last = first + len(records) - 1
        return _Outgoing(
            first,
            last,
            _encode(self._log_id, first, records, joined),
            f"walasync:{self._log_hex}:{first}-{last}",
            self._cuts,
        )


async def _next_msg(sub: Any, timeout: float) -> Msg:
    """`sub.next_msg(timeout)`, which a cancellation always interrupts: nats-py awaits an
    inner task whose `wait_for` can return a message that arrives with the cancellation
    and so swallow it (Python 3.10-3.11), and a cancelled `Follower.run(follow=True)` would
    then go on for ever. A message taken meanwhile is left: the local log says where to
    resume."""
    get = asyncio.ensure_future(sub.next_msg(timeout=timeout))
    try:
        return await asyncio.shield(get)
    except asyncio.CancelledError:
        get.cancel()
        # Whatever it ends with (ConnectionClosedError if the client closes meanwhile) is
        # of no interest now, and must not be logged as never retrieved.
        get.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise


class _Redeliver(Exception):
    """A consumer's delivery out of the stream's order: a new session subscribes again."""


async def _stored_at(js: JetStreamContext, follower: Follower, seq: int) -> bool:
    """Whether the stream has a message at sequence `seq` (not deleted or expired)."""
    at = await _message_at(js, follower.stream, follower.subject, seq)
    return at is not None and at[0] == seq


class _PublishError(Exception):
    """A publish failed in a way that a new session from the stream's state cures."""


def _ok(fut: asyncio.Future[bytes]) -> bool:
    return fut.done() and not fut.cancelled() and fut.exception() is None


# -- the follower -----------------------------------------------------------------------------


class Follower:
    """Applies a replicated stream to a local log, so that it holds the source's records
    under the same LSNs (open a new replica with `first_lsn` set to the stream's first LSN:
    `restore` does).

    `run()` resumes after the local log's last record: it checks that the stream's message
    holding that record has the same records (else `StreamContentError`: another log or
    another history), then applies each following message as one `append_many` unit,
    checking identity, checksum and LSN continuity. `on_apply(first, last)` is called after
    each message is durable locally (hot-standby lag measurement).
    """

    def __init__(
        self,
        wal: Wal,
        nats: NATS | str | Sequence[str],
        stream: str,
        *,
        subject: str | None = None,
        connect_options: dict[str, Any] | None = None,
        on_apply: Callable[[int, int], object] | None = None,
        pipeline: int = 64,
    ) -> None:
        self.wal = wal
        self.stream = stream
        self.subject = subject or f"walasync.{stream}"
        self._conn = _Connection(nats, connect_options or {})
        self._on_apply = on_apply
        self._pipeline = pipeline
        self.log_id: bytes | None = None
        """The source log's identity, once a message was seen."""
        self.applied_lsn = wal.last_lsn
        """The highest LSN applied and durable in the local log."""
        self.error: BaseException | None = None

    async def run(self, *, follow: bool = False, idle_timeout: float = 5.0) -> int:
        """Apply the stream to the local log; return its last LSN.

        Without `follow`, returns once the local log holds every message the stream held
        when called; with `follow`, goes on for ever (cancel it to stop), retrying after
        transient failures.

        Raises:
            StreamNotFoundError, StreamContentError, ConnectError, AuthError, and the
            local log's errors.
        """
        backoff = 0.05
        try:
            while True:
                try:
                    if await self._session(follow, idle_timeout):
                        return self.wal.last_lsn
                    backoff = 0.05
                except asyncio.CancelledError:  # noqa: PERF203 - a session per loop pass
                    raise
                except (ReplicationError, WalError):
                    raise
                except Exception as exc:
                    self.error = exc
                    _log.info("following %s: %r; resuming", self.stream, exc)
                    await self._conn.close()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF)
        finally:
            await self._conn.close()

    async def _session(self, follow: bool, idle_timeout: float) -> bool:
        """Apply messages until caught up (True) or, following, until a failure."""
        nc = await self._conn.get()
        js = nc.jetstream()
        state = (await _stream_info(js, self.stream)).state
        target = state.last_seq
        nxt = self.wal.last_lsn + 1
        start_seq = await self._resume_point(js, state, nxt)
        if start_seq is None:
            if not follow:
                return True
            start_seq = state.last_seq + 1
        sub = await js.subscribe(
            self.subject,
            stream=self.stream,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            config=api.ConsumerConfig(opt_start_seq=start_seq),
            pending_bytes_limit=256 << 20,
        )
        applying: deque[tuple[asyncio.Future[range], int, int]] = deque()
        try:
            while True:
                if (not follow and start_seq > target) or sub.pending_msgs == 0:
                    # Caught up, or nothing more has arrived: finish what is being applied.
                    while applying:
                        await self._applied(*applying.popleft())
                    if not follow and start_seq > target:
                        return True
                try:
                    msg = await _next_msg(sub, idle_timeout)
                except nats.errors.TimeoutError:
                    if follow:
                        continue
                    raise
                message = decode_message(msg.headers, msg.data)
                if self.log_id is None:
                    self.log_id = message.log_id
                elif message.log_id != self.log_id:
                    raise StreamContentError(
                        f"stream {self.stream!r} holds two logs' records "
                        f"({self.log_id.hex()} and {message.log_id.hex()})"
                    )
                if message.lsn != nxt:
                    what = "a gap" if message.lsn > nxt else "a repeat"
                    delivered = msg.metadata.sequence.stream
                    if delivered != start_seq and await _stored_at(js, self, start_seq):
                        # The stream holds the message due next, the consumer skipped or
                        # repeated it (JetStream has had such bugs around leader changes).
                        raise _Redeliver(
                            f"the consumer delivered sequence {delivered} "
                            f"({message.lsn}-{message.last_lsn}), not {start_seq} ({what}): "
                            "subscribing again"
                        )
                    raise StreamContentError(
                        f"stream {self.stream!r}: expected LSN {nxt}, the next message holds "
                        f"{message.lsn}-{message.last_lsn} ({what})"
                    )
                nxt = message.last_lsn + 1
                start_seq = msg.metadata.sequence.stream + 1
                applying.append(
                    (
                        asyncio.ensure_future(self.wal.append_many(message.records)),
                        message.lsn,
                        message.last_lsn,
                    )
                )
                while applying and (len(applying) >= self._pipeline or applying[0][0].done()):
                    await self._applied(*applying.popleft())
        finally:
            for fut, _, _ in applying:
                if not fut.done():
                    with contextlib.suppress(BaseException):
                        await fut
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _applied(self, fut: asyncio.Future[range], first: int, last: int) -> None:
        lsns = await fut
        if lsns.start != first or lsns[-1] != last:  # pragma: no cover - a bug, not input
            raise WalError(f"records {first}-{last} were appended at {lsns}")
        self.applied_lsn = last
        if self._on_apply is not None:
            self._on_apply(first, last)

    async def _resume_point(
        self, js: JetStreamContext, state: api.StreamState, nxt: int
    ) -> int | None:
        """The stream sequence of the message starting at LSN `nxt`, after checking that the
        message before it matches the local log; None if the stream has nothing after."""
        if state.messages == 0:
            return None
        head = await _message_at(js, self.stream, self.subject, state.first_seq)
        if head is None:
            return None
        if head[1].lsn > nxt:
            raise StreamContentError(
                f"stream {self.stream!r} starts at LSN {head[1].lsn}; the local log needs "
                f"{nxt} next: records {nxt}..{head[1].lsn - 1} are missing"
            )
        if nxt - 1 >= max(self.wal.first_lsn, head[1].lsn):
            # The local log has records the stream has too: the message ending at its last
            # one must hold the same records.
            at = await _find(js, self.stream, self.subject, state, nxt - 1)
            if at is None:
                raise StreamContentError(
                    f"stream {self.stream!r} ends before LSN {nxt - 1}, the local log's last"
                )
            seq, msg = at
            if (
                msg.last_lsn != nxt - 1
                or [r.data async for r in self.wal.read(max(msg.lsn, self.wal.first_lsn))]
                != msg.records[max(0, self.wal.first_lsn - msg.lsn) :]
            ):
                raise StreamContentError(
                    f"stream {self.stream!r} is not this replica's source: its records "
                    f"{msg.lsn}-{msg.last_lsn} differ from the local log's"
                )
            self.log_id = msg.log_id
            nxt_at = await _message_at(js, self.stream, self.subject, seq + 1)
            return None if nxt_at is None else nxt_at[0]
        at = await _find(js, self.stream, self.subject, state, nxt)
        if at is None:
            return None
        if at[1].lsn != nxt:
            raise StreamContentError(
                f"stream {self.stream!r}: no message starts at LSN {nxt} (the one holding it "
                f"is {at[1].lsn}-{at[1].last_lsn})"
            )
        return at[0]


async def restore(
    nats: NATS | str | Sequence[str],
    stream: str,
    path: str | os.PathLike[str],
    *,
    subject: str | None = None,
    follow: bool = False,
    connect_options: dict[str, Any] | None = None,
    on_apply: Callable[[int, int], object] | None = None,
    **options: Any,
) -> int:
    """Rebuild (or bring up to date) the log in directory `path` from a replicated stream,
    with the source's LSNs, and return its last LSN. A new log starts at the stream's first
    LSN; an existing one continues after its last record (see `Follower`, which calls
    `on_apply`). `options` go to `walasync.open`; `follow=True` keeps applying new messages
    until cancelled.

    Raises:
        StreamNotFoundError, StreamContentError, ConnectError, AuthError, WalError.
    """
    loop = asyncio.get_running_loop()
    exists = await loop.run_in_executor(None, os.path.exists, os.path.join(path, "META"))
    first_lsn = None
    if not exists:
        conn = _Connection(nats, connect_options or {})
        try:
            js = (await conn.get()).jetstream()
            first_lsn = await _first_lsn(js, stream, subject or f"walasync.{stream}")
        finally:
            await conn.close()
    async with open_wal(path, first_lsn=first_lsn, **options) as wal:
        follower = Follower(
            wal, nats, stream, subject=subject, connect_options=connect_options, on_apply=on_apply
        )
        return await follower.run(follow=follow)
