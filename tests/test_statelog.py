"""`walasync.StateLog`: state replay with snapshots.

Unit tests on real files (apply, checkpoint, undo, reopen, errors, concurrency and
cancellation, damaged snapshots), then on `SimulatedDisk`: a power loss before every step
of a workload of applies, checkpoints (concurrent with applies) and undos, each image
recovered with the real code; a hypothesis state machine (apply, concurrent applies,
checkpoint, undo, reopen, power loss) against a plain model; and a short SIGKILL torture
of a process that applies, checkpoints and undoes (`tests/_statewriter.py`).

Environment: WALASYNC_STATE_EXAMPLES (default 40) and WALASYNC_STATE_STEPS (default 30)
for the model, WALASYNC_STATE_ROUNDS (default 6) SIGKILL rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import json
import logging
import os
import pickle
import random
import struct
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import LOOPS, cancel_after, loops, run
from crc32c import crc32c
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from test_crash_sim import tree

import walasync
from walasync import NothingToUndoError, Options, StateLog
from walasync.testing import SimulatedDisk

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
EXAMPLES = int(os.environ.get("WALASYNC_STATE_EXAMPLES", "40"))
STEPS = int(os.environ.get("WALASYNC_STATE_STEPS", "30"))
ROUNDS = int(os.environ.get("WALASYNC_STATE_ROUNDS", "6"))
SMALL = Options(segment_size=4096)

Doc = dict[str, Any]


def put(state: Doc, event: Doc) -> Doc:
    """A key-value state: set or delete one key (in place)."""
    if event.get("del"):
        state.pop(event["key"], None)
    else:
        state[event["key"]] = event["value"]
    return state


def kv(path: Path | str, **kw: Any) -> walasync.Opener[StateLog[Doc, Doc]]:
    return StateLog.open(path, initial=dict, apply=put, **kw)


def ids(state: list[str], event: Doc) -> list[str]:
    """A state that is the sequence of events applied (their ids), in order."""
    state.append(event["id"])
    return state


def seq(path: Path | str, **kw: Any) -> walasync.Opener[StateLog[list[str], Doc]]:
    return StateLog.open(path, initial=list, apply=ids, **kw)


def ev(name: str, pad: int = 0) -> Doc:
    return {"id": name, "pad": "x" * pad}


async def log_bounds(path: Path) -> tuple[int, int]:
    """(first_lsn, last_lsn) of the closed log at `path`."""
    async with walasync.open(path, readonly=True) as wal:
        return wal.first_lsn, wal.last_lsn


# -- apply, reopen, checkpoint ---------------------------------------------------------------


async def test_applied_events_survive_reopen(tmp_path: Path) -> None:
    async with kv(tmp_path / "s") as s:
        assert (s.state, s.last_lsn, s.snapshot_lsn) == ({}, 0, 0)
        assert await s.apply({"key": "a", "value": 1}) == 1
        assert await s.apply({"key": "b", "value": [1, 2]}) == 2
        assert await s.apply({"key": "a", "del": True}) == 3
        assert s.state == {"b": [1, 2]} and s.last_lsn == 3
    async with kv(tmp_path / "s") as s:
        assert s.state == {"b": [1, 2]}
        assert (s.last_lsn, s.snapshot_lsn) == (3, 0)
        assert await s.apply({"key": "c", "value": None}) == 4
    assert await log_bounds(tmp_path / "s") == (1, 4)


async def test_checkpoint_snapshots_then_drops_the_covered_records(tmp_path: Path) -> None:
    path = tmp_path / "s"
    async with seq(path, options=SMALL) as s:
        for i in range(30):
            await s.apply(ev(f"e{i}", 300))  # several 4 KiB segments
        assert await s.checkpoint() == 30
        assert s.snapshot_lsn == 30
        assert await s.checkpoint() == 30  # nothing new: nothing written
        await s.apply(ev("after"))
    assert await log_bounds(path) == (31, 31)
    assert len(list(path.glob("*.wal"))) == 1  # the segments it covered are gone
    async with seq(path, options=SMALL) as s:
        assert s.state == [f"e{i}" for i in range(30)] + ["after"]
        assert (s.snapshot_lsn, s.last_lsn) == (30, 31)
    assert not (path / "STATE.tmp").exists()


async def test_checkpoint_of_nothing_writes_no_snapshot(tmp_path: Path) -> None:
    async with seq(tmp_path / "s") as s:
        assert await s.checkpoint() == 0
    assert not (tmp_path / "s" / "STATE").exists()


async def test_should_checkpoint_counts_records_and_bytes_since_the_snapshot(
    tmp_path: Path,
) -> None:
    async with seq(tmp_path / "r", checkpoint_records=3, checkpoint_bytes=None) as s:
        for _ in range(2):
            await s.apply(ev("a"))
        assert not s.should_checkpoint
        await s.apply(ev("a"))
        assert s.should_checkpoint
        await s.checkpoint()
        assert not s.should_checkpoint
        for _ in range(2):
            await s.apply(ev("a"))
    async with seq(tmp_path / "r", checkpoint_records=3, checkpoint_bytes=None) as s:
        assert not s.should_checkpoint  # two events after the snapshot, replayed
        await s.apply(ev("a"))
        assert s.should_checkpoint
        await s.undo()
        assert not s.should_checkpoint
    size = len(json.dumps(ev("b", 50), separators=(",", ":")))
    async with seq(tmp_path / "b", checkpoint_bytes=3 * size, checkpoint_records=None) as s:
        await s.apply(ev("b", 50))
        await s.apply(ev("b", 50))
        assert not s.should_checkpoint
        await s.apply(ev("b", 50))
        assert s.should_checkpoint
    async with seq(tmp_path / "n", checkpoint_bytes=None) as s:
        await s.apply(ev("b", 50))
        assert not s.should_checkpoint


async def test_options_are_checked(tmp_path: Path) -> None:
    for bad in (
        {"options": Options(retention_bytes=1 << 20)},
        {"options": Options(retention_age=60.0)},
        {"checkpoint_bytes": 0},
        {"checkpoint_records": -1},
        {"checkpoint_records": True},
    ):
        with pytest.raises(ValueError):
            seq(tmp_path / "s", **bad)
    with pytest.raises(ValueError):
        seq("")


async def test_what_is_applied_is_what_replay_applies(tmp_path: Path) -> None:
    """Events are applied as decoded from the log, and a checkpoint continues from the
    decoded snapshot: with JSON, a tuple is a list and an int key a string, live too."""
    seen: list[Any] = []

    def keep(state: dict[Any, Any], event: Any) -> dict[Any, Any]:
        seen.append(event)
        state[event[0]] = event[1]
        return state

    async with StateLog.open(tmp_path / "s", initial=dict, apply=keep) as s:
        await s.apply((1, "x"))
        assert seen == [[1, "x"]]
        assert s.state == {1: "x"}
        await s.checkpoint()
        assert s.state == {"1": "x"}
        await s.apply((2, "y"))
        live = dict(s.state)
    async with StateLog.open(tmp_path / "s", initial=dict, apply=keep) as s:
        assert s.state == live == {"1": "x", 2: "y"}


async def test_pickle_and_a_separate_state_serializer(tmp_path: Path) -> None:
    """The pickle module is a serializer as it is; the snapshot may use another one."""

    def add(state: set[tuple[int, int]], event: tuple[int, int]) -> set[tuple[int, int]]:
        return state | {event}

    def opener() -> walasync.Opener[StateLog[set[tuple[int, int]], tuple[int, int]]]:
        return StateLog.open(
            tmp_path / "s", initial=set, apply=add, serializer=pickle, state_serializer=Sets()
        )

    class Sets:
        def dumps(self, obj: set[tuple[int, int]], /) -> bytes:
            return json.dumps(sorted(obj)).encode()

        def loads(self, data: bytes, /) -> set[tuple[int, int]]:
            return {(a, b) for a, b in json.loads(data)}

    async with opener() as s:
        await s.apply((1, 2))
        await s.apply((3, 4))
        await s.checkpoint()
        await s.apply((5, 6))
    async with opener() as s:
        assert s.state == {(1, 2), (3, 4), (5, 6)}
    snapshot = (tmp_path / "s" / "STATE").read_bytes()
    assert snapshot.endswith(b"[[1, 2], [3, 4]]")


async def test_msgspec_serializer(tmp_path: Path) -> None:
    """The README's msgspec adapter: typed decoding of events and of the state."""
    msgspec = pytest.importorskip("msgspec")

    class Msgspec:
        def __init__(self, kind: Any) -> None:
            self._enc = msgspec.msgpack.Encoder()
            self._dec = msgspec.msgpack.Decoder(kind)

        def dumps(self, obj: Any, /) -> bytes:
            return self._enc.encode(obj)  # type: ignore[no-any-return]

        def loads(self, data: bytes, /) -> Any:
            return self._dec.decode(data)

    class Deposit(msgspec.Struct):  # type: ignore[misc, name-defined]
        account: str
        amount: int

    def deposit(state: dict[str, int], event: Any) -> dict[str, int]:
        assert isinstance(event, Deposit)
        state[event.account] = state.get(event.account, 0) + event.amount
        return state

    def opener() -> walasync.Opener[StateLog[dict[str, int], Any]]:
        return StateLog.open(
            tmp_path / "s",
            initial=dict,
            apply=deposit,
            serializer=Msgspec(Deposit),
            state_serializer=Msgspec(dict[str, int]),
        )

    async with opener() as s:
        await s.apply(Deposit("alice", 5))
        await s.checkpoint()
        await s.apply(Deposit("alice", 2))
    async with opener() as s:
        assert s.state == {"alice": 7}


# -- undo --------------------------------------------------------------------------------------


async def test_undo_removes_the_last_event_and_rebuilds(tmp_path: Path) -> None:
    path = tmp_path / "s"
    async with kv(path) as s:
        with pytest.raises(NothingToUndoError):
            await s.undo()
        await s.apply({"key": "a", "value": 1})
        await s.apply({"key": "a", "value": 2})
        assert await s.undo() == {"key": "a", "value": 2}
        assert s.state == {"a": 1} and s.last_lsn == 1
        assert await s.apply({"key": "b", "value": 3}) == 2  # the LSN is reused
        await s.checkpoint()
        with pytest.raises(NothingToUndoError, match="LSN 2"):
            await s.undo()  # every event is in the snapshot
        assert s.state == {"a": 1, "b": 3}
        await s.apply({"key": "a", "del": True})
        await s.apply({"key": "c", "value": 4})
    async with kv(path) as s:
        assert s.state == {"b": 3, "c": 4}
        await s.undo()
        assert await s.undo() == {"key": "a", "del": True}
        assert s.state == {"a": 1, "b": 3}
        with pytest.raises(NothingToUndoError):
            await s.undo()
        assert (s.last_lsn, s.snapshot_lsn) == (2, 2)
    async with kv(path) as s:
        assert s.state == {"a": 1, "b": 3}
    assert await log_bounds(path) == (3, 2)


async def test_undo_waits_for_applies_in_flight_and_holds_new_ones(tmp_path: Path) -> None:
    async with seq(tmp_path / "s") as s:
        first = [asyncio.ensure_future(s.apply(ev(f"a{i}"))) for i in range(20)]
        await asyncio.sleep(0)  # they are in flight
        undo = asyncio.ensure_future(s.undo())
        await asyncio.sleep(0)
        later = [asyncio.ensure_future(s.apply(ev(f"b{i}"))) for i in range(5)]
        lsns = await asyncio.gather(*first)
        removed = await undo
        assert sorted(lsns) == list(range(1, 21))
        assert removed == ev(f"a{lsns.index(20)}")  # the last applied, not a later one
        assert sorted(await asyncio.gather(*later)) == list(range(20, 25))
        live = list(s.state)
    assert removed["id"] not in live and len(live) == 24
    async with seq(tmp_path / "s") as s:
        assert s.state == live


# -- failures ---------------------------------------------------------------------------------


def picky(state: Doc, event: Doc) -> Doc:
    """Appends the key to a list in place, then raises for "bad" ones: a partial change."""
    state.setdefault("seen", []).append(event["key"])
    if event["key"].startswith("bad"):
        raise KeyError(event["key"])
    state["ok"] = state.get("ok", 0) + 1
    return state


async def test_an_apply_function_error_is_logged_and_replayed_the_same(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def opener() -> walasync.Opener[StateLog[Doc, Doc]]:
        return StateLog.open(tmp_path / "s", initial=dict, apply=picky)

    async with opener() as s:
        await s.apply({"key": "a"})
        with pytest.raises(walasync.ApplyError) as info:
            await s.apply({"key": "bad1"})
        assert info.value.lsn == 2 and isinstance(info.value.__cause__, KeyError)
        assert s.last_lsn == 2  # it counts as applied: it is in the log
        assert s.state == {"seen": ["a", "bad1"], "ok": 1}  # as the function left it
        await s.apply({"key": "b"})
        live = copy.deepcopy(s.state)
    with caplog.at_level(logging.WARNING, logger="walasync"):
        async with opener() as s:
            assert s.state == live
            assert s.last_lsn == 3
    assert "replaying LSN 2" in caplog.text
    async with opener() as s:
        with pytest.raises(walasync.ApplyError):
            await s.apply({"key": "bad2"})
        await s.undo()  # the way to take it back
        assert s.state == live


async def test_a_failed_append_changes_nothing(tmp_path: Path) -> None:
    async with kv(tmp_path / "s", options=Options(max_record_size=64)) as s:
        await s.apply({"key": "a", "value": 1})
        with pytest.raises(walasync.RecordTooLargeError):
            await s.apply({"key": "b", "value": "x" * 100})
        with pytest.raises(TypeError):
            await s.apply({"key": "c", "value": object()})  # JSON cannot encode it
        assert s.state == {"a": 1} and s.last_lsn == 1
        assert await s.apply({"key": "d", "value": 2}) == 2


async def test_a_broken_log_applies_nothing_more() -> None:
    disk = SimulatedDisk.from_files({}, dirs=["/d"])
    async with seq("/d/s", io=disk, options=SMALL) as s:
        await s.apply(ev("a"))
        disk.fail_at("fdatasync", 1, errno.EIO)
        results = await asyncio.gather(
            *(s.apply(ev(f"b{i}")) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, walasync.BrokenLogError) for r in results)
        assert s.state == ["a"] and s.last_lsn == 1
        with pytest.raises(walasync.BrokenLogError):
            await s.apply(ev("c"))
        with pytest.raises(walasync.BrokenLogError):
            await s.checkpoint()
    async with seq("/d/s", io=disk.crash(), options=SMALL) as s:
        assert s.state == ["a"]


async def test_a_failed_snapshot_write_leaves_state_and_log_usable() -> None:
    disk = SimulatedDisk.from_files({}, dirs=["/d"])
    async with seq("/d/s", io=disk, options=SMALL) as s:
        for i in range(3):
            await s.apply(ev(f"a{i}"))
        disk.fail_at("rename", 1, errno.EIO)
        with pytest.raises(walasync.WalError):
            await s.checkpoint()
        assert s.snapshot_lsn == 0
        with pytest.raises(NothingToUndoError):
            await s.undo()  # the rename may have happened: the snapshot may hold a2
        await s.apply(ev("b"))
        assert await s.checkpoint() == 4
    async with seq("/d/s", io=disk.crash(), options=SMALL) as s:
        assert s.state == ["a0", "a1", "a2", "b"] and s.snapshot_lsn == 4


async def test_cancelled_callers_events_are_still_applied_in_order(tmp_path: Path) -> None:
    async with seq(tmp_path / "s") as s:
        caller = asyncio.ensure_future(s.apply(ev("cancelled")))
        await asyncio.sleep(0)  # its append is under way
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        async with cancel_after(10):  # a gap left would wait forever
            assert await s.apply(ev("next")) == 2
        assert s.state == ["cancelled", "next"]
    async with seq(tmp_path / "s") as s:
        assert s.state == ["cancelled", "next"]


async def test_cancelling_a_checkpoint_or_undo_does_not_stop_it(tmp_path: Path) -> None:
    async with seq(tmp_path / "s") as s:
        await s.apply(ev("a"))
        await s.apply(ev("b"))
        task = asyncio.ensure_future(s.checkpoint())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await s.apply(ev("c"))
        undo = asyncio.ensure_future(s.undo())
        await asyncio.sleep(0)
        undo.cancel()
        with pytest.raises(asyncio.CancelledError):
            await undo
        await s.close()  # waits for both
        assert s.state == ["a", "b"]
    async with seq(tmp_path / "s") as s:
        assert s.state == ["a", "b"] and s.snapshot_lsn == 2


async def test_closed(tmp_path: Path) -> None:
    s = await seq(tmp_path / "s")
    applying = asyncio.ensure_future(s.apply(ev("a")))
    await asyncio.sleep(0)
    await s.close()
    assert await applying == 1  # close let it finish
    await s.close()
    assert s.closed and "closed" in repr(s)
    for call in (s.apply(ev("b")), s.checkpoint(), s.undo()):
        with pytest.raises(walasync.ClosedError):
            await call


# -- concurrency: group commit, LSN order ------------------------------------------------------


async def test_concurrent_applies_share_batches() -> None:
    disk = SimulatedDisk.from_files({}, dirs=["/d"])
    async with seq("/d/s", io=disk, options=Options(segment_size=1 << 20)) as s:
        await s.apply(ev("warm"))
        writes = 0

        def count(step: int, op: str) -> None:
            nonlocal writes
            writes += op == "write"

        disk.on_step = count
        lsns = await asyncio.gather(*(s.apply(ev(f"e{i}")) for i in range(200)))
        disk.on_step = None
        assert sorted(lsns) == list(range(2, 202))
        assert writes <= 4, f"{writes} writes for 200 concurrent applies"
        order = [s.state[lsn - 1] for lsn in range(2, 202)]
        assert order == [f"e{lsns.index(lsn)}" for lsn in range(2, 202)]


async def test_events_are_applied_in_lsn_order_whatever_order_appends_return(
    tmp_path: Path,
) -> None:
    """A log whose appends return out of order (a later LSN first): each event still waits
    for every lower LSN, and each caller gets its own LSN."""
    inner = await walasync.open(tmp_path / "log")

    class Reversing:
        """Holds appends until three are queued, then lets them return last first."""

        def __init__(self) -> None:
            self.held: list[asyncio.Future[None]] = []
            self.log_id, self.path = inner.log_id, inner.path

        async def append(self, data: bytes) -> int:
            lsn = await inner.append(data)
            gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.held.append(gate)
            if len(self.held) == 3:
                for g in reversed(self.held):
                    g.set_result(None)
                    await asyncio.sleep(0)
            await gate
            return lsn

    order: list[str] = []

    def note(state: list[str], event: Doc) -> list[str]:
        order.append(event["id"])
        return ids(state, event)

    fake: Any = Reversing()
    s = StateLog(
        fake,
        walasync.FileIO(),
        note,
        list,
        walasync.JSONSerializer(),
        walasync.JSONSerializer(),
        None,
        None,
    )
    try:
        lsns = await asyncio.gather(*(s.apply(ev(f"e{i}")) for i in range(3)))
    finally:
        await inner.close()
    assert lsns == [1, 2, 3]
    assert order == ["e0", "e1", "e2"] == s.state


async def test_checkpoints_while_applies_run(tmp_path: Path) -> None:
    async with seq(tmp_path / "s", options=SMALL) as s:

        async def applier(i: int) -> None:
            for j in range(15):
                await s.apply(ev(f"{i}.{j}", 200))

        async def checkpointer() -> None:
            for _ in range(5):
                await s.checkpoint()
                await asyncio.sleep(0)

        await asyncio.gather(*(applier(i) for i in range(6)), checkpointer())
        live = list(s.state)
        snapshot = s.snapshot_lsn
    assert len(live) == 90 and len(set(live)) == 90
    async with seq(tmp_path / "s", options=SMALL) as s:
        assert s.state == live and s.snapshot_lsn == snapshot


# -- the snapshot file --------------------------------------------------------------------------


async def make_snapshot(path: Path) -> bytes:
    async with seq(path) as s:
        await s.apply(ev("a"))
        await s.apply(ev("b"))
        await s.checkpoint()
        await s.apply(ev("c"))
    return (path / "STATE").read_bytes()


def forge(data: bytes, **changes: int) -> bytes:
    """The snapshot `data` with header fields changed and its checksum made valid again."""
    head = list(struct.unpack_from("<8sHHI16sQQ", data))
    for name, value in changes.items():
        head[{"version": 1, "lsn": 5, "length": 6}[name]] = value
    packed = struct.pack("<8sHHI16sQQ", *head)
    body = data[52:]
    return packed + struct.pack("<I", crc32c(body, crc32c(packed))) + body


@pytest.mark.parametrize(
    "damage",
    ["flip", "short", "long", "empty", "magic", "version", "other-log", "past-end", "gap", "gone"],
)
async def test_a_bad_snapshot_is_a_corruption_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "s"
    data = await make_snapshot(path)
    if damage == "gap":  # records after the snapshot lost: the log starts later than it says
        async with walasync.open(path) as wal:
            await wal.truncate_front(4)
    elif damage == "gone":
        async with walasync.open(path) as wal:
            assert wal.first_lsn == 3
    elif damage == "other-log":
        data = await make_snapshot(tmp_path / "other")
    elif damage == "past-end":
        data = forge(data, lsn=9)
    elif damage == "version":
        data = forge(data, version=2)
    else:
        data = {
            "flip": data[:60] + bytes([data[60] ^ 1]) + data[61:],
            "short": data[:-1],
            "long": data + b"\0",
            "empty": b"",
            "magic": b"X" + data[1:],
        }[damage]
    if damage == "gone":
        (path / "STATE").unlink()
    else:
        (path / "STATE").write_bytes(data)
    error = walasync.UnsupportedFormatError if damage == "version" else walasync.CorruptionError
    with pytest.raises(error) as info:
        await seq(path)
    assert info.value.path == str(path / "STATE")
    async with walasync.open(path) as wal:  # the failed open let the log go
        assert wal.last_lsn == 3


async def test_a_checkpoint_cut_short_is_finished_on_open(tmp_path: Path) -> None:
    """A snapshot written but the log not truncated (a crash in between): opening
    replays only what follows the snapshot, and truncates."""
    path = tmp_path / "s"
    async with seq(path) as s:
        for name in "abc":
            await s.apply(ev(name))
        await s.checkpoint()
        snapshot = (path / "STATE").read_bytes()
        await s.apply(ev("d"))
    shutil_log = tmp_path / "copy"
    async with seq(shutil_log) as s:  # the same events, no checkpoint
        for name in "abcd":
            await s.apply(ev(name))
    (shutil_log / "STATE").write_bytes(forge(snapshot))  # not this log's: refused
    with pytest.raises(walasync.CorruptionError, match="another log"):
        await seq(shutil_log)
    async with walasync.open(shutil_log) as wal:
        log_id = wal.log_id
    head = bytearray(snapshot)
    head[16:32] = log_id
    (shutil_log / "STATE").write_bytes(forge(bytes(head)))
    (shutil_log / "STATE.tmp").write_bytes(b"half a snapshot")
    assert await log_bounds(shutil_log) == (1, 4)
    async with seq(shutil_log) as s:
        assert s.state == ["a", "b", "c", "d"] and s.snapshot_lsn == 3
    assert await log_bounds(shutil_log) == (4, 4)
    assert not (shutil_log / "STATE.tmp").exists()


async def test_relaxed_durability_syncs_the_log_before_the_snapshot() -> None:
    """In INTERVAL mode a checkpoint makes the log durable up to the snapshot before it
    writes it: a power loss at any step of the checkpoint leaves a snapshot that the log
    meets, and every event the snapshot holds."""
    disk = SimulatedDisk.from_files({}, dirs=["/d"])
    relaxed = Options(
        durability=walasync.Durability.INTERVAL, sync_interval=3600, segment_size=4096
    )
    images: list[SimulatedDisk] = []
    async with seq("/d/s", io=disk, options=relaxed) as s:
        for name in "abc":
            await s.apply(ev(name))
        disk.on_step = lambda step, op: images.append(disk.crash())
        await s.checkpoint()
        disk.on_step = None
        images.append(disk.crash())
        await s.apply(ev("d"))  # not synced: a power loss may take it
    assert len(images) > 5
    for image in images:
        async with seq("/d/s", io=image, options=relaxed) as s:
            assert s.state in (["a", "b", "c"][:n] for n in range(4))
    async with seq("/d/s", io=images[-1], options=relaxed) as s:
        assert s.state == ["a", "b", "c"] and s.snapshot_lsn == 3


# -- crash at every step -----------------------------------------------------------------------


ROOT = "/data"
LOG = "/data/state"
MODES = ("drop", "torn", "reorder")


@dataclass
class Image:
    step: int
    op: str
    mode: str
    disk: SimulatedDisk
    # The logs a recovery may show: LSN -> event id, and ids of applies under way.
    allowed: list[tuple[dict[int, str], frozenset[str]]]

    def __str__(self) -> str:
        return f"power loss before step {self.step} ({self.op}), mode {self.mode}"


class Session:
    """Drives a StateLog of event ids on a disk, taking crash images before every step
    along with what each may recover to."""

    def __init__(self, disk: SimulatedDisk, seed: int) -> None:
        self.disk = disk
        self.rng = random.Random(seed)
        self.log: dict[int, str] = {}  # acknowledged: LSN -> id
        self.pending: set[str] = set()  # applies begun and not returned
        self.cutting: int | None = None  # an undo under way removes this LSN
        self.images: list[Image] = []
        disk.on_step = self.capture

    def capture(self, step: int, op: str) -> None:
        allowed = [(dict(self.log), frozenset(self.pending))]
        if self.cutting is not None:
            kept = {lsn: i for lsn, i in self.log.items() if lsn < self.cutting}
            allowed.append((kept, frozenset(self.pending)))
        for mode in MODES:
            self.images.append(Image(step, op, mode, self.disk.crash(mode, self.rng), allowed))

    async def apply(self, s: StateLog[list[str], Doc], name: str) -> None:
        self.pending.add(name)
        lsn = await s.apply(ev(name, self.rng.randrange(400)))
        self.log[lsn] = name
        self.pending.discard(name)

    async def undo(self, s: StateLog[list[str], Doc]) -> None:
        self.cutting = s.last_lsn
        removed = await s.undo()
        assert removed["id"] == self.log.pop(self.cutting)
        self.cutting = None


async def state_workload(session: Session) -> None:
    async with seq(LOG, io=session.disk, options=SMALL) as s:
        for i in range(4):
            await session.apply(s, f"a{i}")
        await asyncio.gather(*(session.apply(s, f"b{i}") for i in range(6)))
        await s.checkpoint()
        for i in range(3):
            await session.apply(s, f"c{i}")
        await session.undo(s)
        await session.undo(s)
        await asyncio.gather(s.checkpoint(), *(session.apply(s, f"d{i}") for i in range(5)))
        await session.undo(s)
        await s.checkpoint()
        with pytest.raises(NothingToUndoError):
            await s.undo()
        await session.apply(s, "e")
    async with seq(LOG, io=session.disk, options=SMALL) as s:
        await session.apply(s, "f")
        await s.checkpoint()


def fits(state: list[str], log: dict[int, str], extra: frozenset[str]) -> bool:
    if len(state) < max(log, default=0) or len(set(state)) != len(state):
        return False
    return all(log[lsn] == x if lsn in log else x in extra for lsn, x in enumerate(state, 1))


async def check_image(image: Image) -> None:
    disk = image.disk.crash()  # a copy
    async with seq(LOG, io=disk, options=SMALL) as s:
        state = list(s.state)
        assert s.last_lsn == len(state)
        assert any(fits(state, log, extra) for log, extra in image.allowed), (
            f"recovered {state} fits no acknowledged state"
        )
        assert "STATE.tmp" not in disk.listdir(LOG)
        await s.apply(ev("follow"))  # and it goes on
        await s.checkpoint()
    async with seq(LOG, io=disk.crash(), options=SMALL) as s:
        assert s.state == [*state, "follow"]


@loops
def test_crash_at_every_step_of_checkpoints_and_undos(loop: str) -> None:
    """A power loss at any step (of applies, checkpoints while applies run, undos, opens)
    recovers exactly the acknowledged events in LSN order (plus, perhaps, some under way),
    and the recovered state goes on."""

    async def main() -> int:
        session = Session(SimulatedDisk.from_files({}, dirs=[ROOT]), 31)
        await state_workload(session)
        session.disk.on_step = None
        seen: set[tuple[str, object]] = set()
        failures = []
        for image in session.images:
            key = (image.mode, tree(image.disk))
            if key in seen:
                continue
            seen.add(key)
            try:
                await check_image(image)
            except (AssertionError, walasync.WalError) as exc:
                failures.append(f"{image}: {exc!r}")
        assert not failures, f"{len(failures)} of {len(seen)} failed:\n" + "\n".join(failures[:5])
        return len(seen)

    assert run(loop, main()) > 100


# -- the model ---------------------------------------------------------------------------------


def tally(state: Doc, event: int) -> Doc:
    """In place; multiples of 7 raise after changing the state (the change stays)."""
    state["items"].append(event)
    if event % 7 == 0:
        raise ValueError(event)
    state["sum"] += event
    return state


def fresh() -> Doc:
    return {"items": [], "sum": 0}


def fold(events: list[int]) -> Doc:
    state = fresh()
    for e in events:
        with contextlib.suppress(ValueError):
            state = tally(state, e)
    return state


class StateModel(RuleBasedStateMachine):
    """A StateLog on a SimulatedDisk against a list of events and the snapshot's LSN."""

    def __init__(self, loop: str) -> None:
        super().__init__()
        self.loop = LOOPS[loop]()
        self.disk = SimulatedDisk.from_files({}, dirs=[ROOT])
        self.s: StateLog[Doc, int] | None = None
        self.kw: dict[str, Any] = {}
        self.events: list[int] = []
        self.snap = 0

    def run(self, step: Awaitable[T]) -> T:
        return self.loop.run_until_complete(step)

    def open(self) -> None:
        self.s = self.run(StateLog.open(LOG, initial=fresh, apply=tally, io=self.disk, **self.kw))

    @initialize(
        records=st.none() | st.integers(1, 8),
        nbytes=st.none() | st.integers(1, 30),
        segment=st.sampled_from([4096, 65536]),
    )
    def start(self, records: int | None, nbytes: int | None, segment: int) -> None:
        self.kw = {
            "checkpoint_records": records,
            "checkpoint_bytes": nbytes,
            "options": Options(segment_size=segment),
        }
        self.open()

    @property
    def log(self) -> StateLog[Doc, int]:
        assert self.s is not None
        return self.s

    def applied(self, results: list[int | BaseException], events: list[int]) -> None:
        order = []
        for event, result in zip(events, results, strict=True):
            if isinstance(result, walasync.ApplyError):
                assert event % 7 == 0
                order.append((result.lsn, event))
            else:
                assert isinstance(result, int) and event % 7, result
                order.append((result, event))
        order.sort()
        assert [lsn for lsn, _ in order] == list(
            range(len(self.events) + 1, len(self.events) + 1 + len(events))
        )
        self.events += [e for _, e in order]

    async def settle(self, events: list[int]) -> list[int | BaseException]:
        return await asyncio.gather(*(self.log.apply(e) for e in events), return_exceptions=True)

    @rule(event=st.integers(0, 10**6))
    def apply(self, event: int) -> None:
        self.applied(self.run(self.settle([event])), [event])

    @rule(events=st.lists(st.integers(0, 10**6), min_size=2, max_size=8))
    def apply_together(self, events: list[int]) -> None:
        self.applied(self.run(self.settle(events)), events)

    @rule()
    def checkpoint(self) -> None:
        assert self.run(self.log.checkpoint()) == len(self.events)
        self.snap = len(self.events)

    @rule()
    def undo(self) -> None:
        if len(self.events) > self.snap:
            assert self.run(self.log.undo()) == self.events.pop()
        else:
            with pytest.raises(NothingToUndoError):
                self.run(self.log.undo())

    @rule()
    def reopen(self) -> None:
        self.run(self.log.close())
        self.open()

    @precondition(lambda self: self.s is not None)
    @rule(mode=st.sampled_from(["drop", "torn", "reorder"]), seed=st.integers(0, 2**16))
    def power_loss(self, mode: str, seed: int) -> None:
        after = self.disk.crash(mode, random.Random(seed))
        self.run(self.log.close())
        self.disk = after
        self.open()

    @invariant()
    def matches(self) -> None:
        if self.s is None:
            return
        s = self.s
        assert s.state == fold(self.events)
        assert (s.last_lsn, s.snapshot_lsn) == (len(self.events), self.snap)
        since = self.events[self.snap :]
        nbytes = sum(len(str(e)) for e in since)
        records, limit = self.kw["checkpoint_records"], self.kw["checkpoint_bytes"]
        expected = (records is not None and len(since) >= records) or (
            limit is not None and nbytes >= limit
        )
        assert s.should_checkpoint == expected

    def teardown(self) -> None:
        try:
            if self.s is not None:
                self.run(self.s.close())
        finally:
            self.run(self.loop.shutdown_default_executor())
            self.loop.close()


@pytest.mark.timeout(300)
@loops
def test_state_log_matches_model(loop: str) -> None:
    run_state_machine_as_test(
        lambda: StateModel(loop),  # type: ignore[arg-type]
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- SIGKILL -----------------------------------------------------------------------------------


def test_acknowledged_events_survive_sigkill(tmp_path: Path) -> None:
    """A process applying events from 16 coroutines, checkpointing every 200 and undoing
    the last event every 10-50 ms is killed at a random moment (often inside a checkpoint
    or an undo); reopening recovers every event it acknowledged and did not undo, at its
    LSN, no event an undo returned, and nothing it did not try to apply. An undo cut
    short by the kill may have removed the last event, or not."""
    sys.path.insert(0, str(HERE))
    try:
        import _statewriter as writer
    finally:
        sys.path.remove(str(HERE))
    seed = random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    path = tmp_path / "s"
    acked: dict[int, str] = {}
    announced: set[str] = set()
    undone: set[str] = set()
    undos = 0
    before: list[str] = []
    for round_ in range(ROUNDS):
        loop = "uvloop" if round_ % 2 and "uvloop" in LOOPS else "asyncio"
        kind = writer.PLANS[round_ % len(writer.PLANS)]  # each kind of plan, in turn
        out = writer.run_and_kill(path, round_, loop, rng, kind)
        undone |= out.undone
        undos += len(out.undone)
        acked = {lsn: name for lsn, name in acked.items() if name not in undone}
        for lsn, name in out.acks.items():
            assert acked.get(lsn, name) == name, f"LSN {lsn} acknowledged twice (seed {seed})"
        acked.update(out.acks)
        announced |= out.announced

        async def check() -> list[str]:
            async with writer.open_state(path) as s:
                return list(s.state)

        state = run(loop, check())
        context = f"round {round_}, {out.plan}, seed {seed}"
        kept = [name for name in before if name not in undone]
        if out.undoing and state == kept[:-1]:
            kept = state  # the undo cut short took the last event of the round before
        assert state[: len(kept)] == kept, f"earlier events changed ({context})"
        assert not undone & set(state), f"an undone event is back ({context})"
        assert len(set(state)) == len(state), f"an event applied twice ({context})"
        top = max(acked, default=0)
        if out.undoing and len(state) == top - 1:  # the undo cut short took that one
            undone.add(acked.pop(top))
        assert len(state) >= max(acked, default=0), f"acknowledged events lost ({context})"
        for lsn, name in acked.items():
            assert state[lsn - 1] == name, f"LSN {lsn}: {state[lsn - 1]} not {name} ({context})"
        assert set(state) <= announced, f"an event never applied is there ({context})"
        undone |= set(before) - set(state)
        before = state
    assert len(before) > 0
    assert undos > 0, f"no undo returned in {ROUNDS} rounds (seed {seed})"
