"""The examples run, print what they promise and nothing on stderr.

Each example's `main()` runs in this process, on the test's event loop: the default loop
and uvloop both, for real (and under the guard against blocking calls on the loop). Each
example also runs once as a program, as its docstring tells readers to run it (default
loop, warnings as errors), which covers its command line.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import re
import signal
import subprocess
import sys
import threading
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
from conftest import run

import walasync

ROOT = Path(walasync.__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
NAMES = [
    "crash_testing",
    "event_sourcing",
    "group_commit",
    "job_queue",
    "kv_store",
    "quickstart",
    "tcp_service",
]


@cache
def example(name: str) -> ModuleType:
    """examples/NAME.py, imported (its `if __name__ == "__main__"` part does not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def run_main(
    name: str, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest, *args: Path
) -> str:
    """Await examples/NAME.py's main(*args) on this test's loop; return what it printed."""
    kind = (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )
    assert f"[{kind}]" in request.node.name, "not on the loop the test is named for"
    capsys.readouterr()
    await example(name).main(*map(str, args))
    out, err = capsys.readouterr()
    assert not err, err
    return out


def test_the_list_of_examples_is_complete() -> None:
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_runs_as_a_program(name: str) -> None:
    """python examples/NAME.py, with no arguments (a temporary directory where it needs one)."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / f"{name}.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert not proc.stderr, proc.stderr
    assert proc.stdout.strip()


async def test_quickstart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    out = await run_main("quickstart", capsys, request, tmp_path / "log")
    assert "0 records already there" in out
    assert "append      -> LSN 1\n" in out
    assert "append_many -> LSNs 2..3\n" in out
    assert "  1: hello, write-ahead log\n  2: debit alice 10\n  3: credit bob 10\n" in out
    assert out.endswith("reopened: 3 records, last_lsn=3\n")


async def test_quickstart_continues_an_existing_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    await run_main("quickstart", capsys, request, tmp_path / "log")
    out = await run_main("quickstart", capsys, request, tmp_path / "log")
    assert "3 records already there" in out
    assert "append      -> LSN 4\n" in out
    assert "append_many -> LSNs 5..6\n" in out
    assert out.endswith("reopened: 6 records, last_lsn=6\n")


async def test_group_commit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    out = await run_main("group_commit", capsys, request, tmp_path / "log")
    assert re.search(r"^1000 concurrent appends: [\d.]+ ms, [\d,]+ records/s$", out, re.M), out
    assert re.search(r"^100 sequential appends: .* records/s", out, re.M), out
    assert "all 1000 returned LSNs are durable" in out.splitlines()[-1]
    async with walasync.open(tmp_path / "log") as wal:  # the example left a valid log
        assert wal.last_lsn == 1100
        assert [r.lsn async for r in wal.read()] == list(range(1, 1101))


async def test_kv_store_rebuilds_its_state_by_replay_and_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    first = await run_main("kv_store", capsys, request, tmp_path / "kv")
    assert first.startswith("opened: no snapshot, 0 events replayed: {}\n")
    assert "  runs = 1\n" in first
    assert "  alice = 90\n  bob = 10\n" in first
    assert "scratch" not in first and "checkpoint" not in first

    second = await run_main("kv_store", capsys, request, tmp_path / "kv")
    opened = second.splitlines()[0]
    assert opened.startswith("opened: no snapshot, 11 events replayed: {")
    assert "'runs': '1'" in opened and "'greeting': 'hello from run 1'" in opened
    assert "  runs = 2\n" in second
    assert "  greeting = hello from run 2\n" in second
    assert "  alice = 80\n  bob = 20\n" in second
    assert "  sensor4 = 24.5C\n" in second
    assert second.endswith("checkpoint: the snapshot holds events 1..22; the log dropped them\n")

    third = await run_main("kv_store", capsys, request, tmp_path / "kv")
    assert third.startswith("opened: snapshot at LSN 22, 0 events replayed: {'alice': '80'")
    assert "  alice = 70\n  bob = 30\n" in third
    async with walasync.open(tmp_path / "kv") as wal:  # the checkpoint dropped 1..22
        assert (wal.first_lsn, wal.last_lsn) == (23, 33)


async def test_job_queue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    out = await run_main("job_queue", capsys, request, tmp_path / "jobs")
    assert out.startswith("recovered 0 pending jobs\n3 workers did 20 jobs; 0 pending\n")
    assert "checkpoint at LSN 40:" in out
    async with walasync.open(tmp_path / "jobs") as wal:  # every done job's records dropped
        assert (wal.first_lsn, wal.last_lsn) == (41, 40)
    queue = await example("job_queue").JobQueue.open(str(tmp_path / "jobs"))
    try:
        assert queue.pending == {}
        first = await queue.enqueue("a")
        await queue.enqueue("b")
        assert await queue.take() == (first, "a")
    finally:
        await queue.close()
    queue = await example("job_queue").JobQueue.open(str(tmp_path / "jobs"))
    try:
        assert list(queue.pending.values()) == ["a", "b"]  # taken, not acknowledged: again
    finally:
        await queue.close()


def test_job_queue_loses_no_job_to_sigkill(tmp_path: Path) -> None:
    """Three rounds of `job_queue.py DIR --forever` (4 producers, 3 workers, a checkpoint
    every 100 events), each SIGKILLed at a random moment: every job it said was enqueued
    is pending or was being acknowledged; none it said was done is pending; no job that
    was never enqueued appears."""
    rng = random.Random()
    enqueued: dict[str, str] = {}  # job id -> payload
    tried: set[str] = set()  # payloads whose enqueue began
    acking: set[str] = set()
    done: set[str] = set()
    for _ in range(3):
        lines = run_and_kill(
            [str(EXAMPLES / "job_queue.py"), str(tmp_path / "jobs"), "--forever"],
            acks=rng.randint(1, 400),
            prefix="done ",
        )
        for line in lines:
            kind, _, rest = line.partition(" ")
            if kind == "enqueue?":
                tried.add(rest)
            elif kind == "enqueued":
                job, payload = rest.split()
                enqueued[job] = payload
            elif kind in ("ack?", "done"):
                (acking if kind == "ack?" else done).add(rest)

        async def pending() -> dict[str, str]:
            queue = await example("job_queue").JobQueue.open(str(tmp_path / "jobs"))
            try:
                jobs: dict[str, str] = queue.pending
                return jobs
            finally:
                await queue.close()

        left = run("asyncio", pending())
        assert set(enqueued) - done - acking <= set(left), "an enqueued job was lost"
        assert not set(left) & done, "a job acknowledged as done is pending again"
        assert set(left.values()) <= tried, "a job that was never enqueued is pending"
        assert all(enqueued.get(job, payload) == payload for job, payload in left.items())
    assert done, "no job was done in three rounds"


def run_and_kill(argv: list[str], acks: int, prefix: str) -> list[str]:
    """Run a Python program, SIGKILL it once it printed `acks` lines starting with
    `prefix` (or after 60 s), and return every whole line it printed."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    ) as proc:
        killer = threading.Timer(60.0, proc.kill)
        killer.start()
        try:
            assert proc.stdout is not None and proc.stderr is not None
            seen = 0
            for raw in proc.stdout:
                if not raw.endswith(b"\n"):
                    break
                lines.append(raw.decode().rstrip("\n"))
                seen += lines[-1].startswith(prefix)
                if seen >= acks and proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
            stderr = proc.stderr.read().decode()
        finally:
            killer.cancel()
    assert proc.returncode == -signal.SIGKILL, f"exited {proc.returncode}: {stderr}"
    assert not stderr, stderr
    return lines


async def test_crash_testing(
    capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    out = await run_main("crash_testing", capsys, request)
    found = re.search(
        r"^(\d+) power-loss images recovered: no acknowledged transfer lost", out, re.M
    )
    assert found, out
    assert int(found.group(1)) > 30  # at least one image per transfer


async def test_event_sourcing_projections_agree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    first = await run_main("event_sourcing", capsys, request, tmp_path / "events")
    assert first.startswith("live projection caught up with 0 earlier events: {}\n")
    assert "opened alice\nopened bob\nopened carol\n" in first
    assert "withdraw 500 from carol: rejected\n" in first
    assert "transfer 30 alice -> carol: done\nwithdraw 20 from carol: done\n" in first
    assert "events in the log: 17\n" in first
    assert "  alice: 70 (3 events)\n  bob: 50 (11 events)\n  carol: 10 (3 events)\n" in first
    assert first.endswith("live projection == rebuilt projection: True\n")

    second = await run_main("event_sourcing", capsys, request, tmp_path / "events")
    assert second.startswith(
        "live projection caught up with 17 earlier events: {'alice': 70, 'bob': 50, 'carol': 10}\n"
    )
    assert "opened" not in second
    assert "  alice: 140 (5 events)\n  bob: 100 (21 events)\n  carol: 20 (5 events)\n" in second
    assert second.endswith("live projection == rebuilt projection: True\n")


async def test_tcp_service_acknowledges_only_what_is_in_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    """Server and load client on this test's loop: every acknowledged request is in the log."""
    capsys.readouterr()
    acked = await example("tcp_service").in_process(str(tmp_path / "log"), 64, 0.3)
    out, err = capsys.readouterr()
    assert not err, err
    assert re.search(r"^64 connections: [\d,]+ requests acknowledged in [\d.]+ s, ", out, re.M)
    assert len(acked) > 64
    async with walasync.open_keyed(tmp_path / "log") as kv:
        assert all(kv.latest_lsn(key) is not None for key in acked)
        assert len(kv) == kv.last_lsn >= len(acked)  # each request one record, one key


async def test_tcp_service_survives_kill_9_of_the_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    """A server process killed with SIGKILL under load keeps every request it acknowledged."""
    capsys.readouterr()
    result = await example("tcp_service").crash(str(tmp_path / "log"), 64, 0.2)
    out, err = capsys.readouterr()
    assert not err, err
    assert result["acked"] >= 500, result  # killed once 500 were acknowledged: mid-load
    assert result["missing"] == result["unknown"] == 0, result
    assert "acknowledged but missing: 0;" in out
    async with walasync.open_keyed(tmp_path / "log") as kv:  # the restarted server closed it
        assert kv.replayed == 0  # its close wrote the index snapshot
        assert len(kv) == kv.last_lsn == result["in_log"]
