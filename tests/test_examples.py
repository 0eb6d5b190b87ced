"""The examples run, exit 0, print what they promise and nothing on stderr."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import walasync

ROOT = Path(walasync.__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


async def run_example(name: str, *args: str | Path) -> str:
    """Run examples/NAME.py as a program (warnings are errors); return its stdout."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "error",
        str(EXAMPLES / f"{name}.py"),
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert not err, err.decode()
    return out.decode()


async def test_quickstart_in_a_temporary_directory() -> None:
    out = await run_example("quickstart")
    assert "append      -> LSN 1\n" in out
    assert "append_many -> LSNs 2..3\n" in out
    assert "  1: hello, write-ahead log\n  2: debit alice 10\n  3: credit bob 10\n" in out
    assert out.endswith("reopened: 3 records, last_lsn=3\n")


async def test_quickstart_continues_an_existing_log(tmp_path: Path) -> None:
    await run_example("quickstart", tmp_path / "log")
    out = await run_example("quickstart", tmp_path / "log")
    assert "3 records already there" in out
    assert "append      -> LSN 4\n" in out
    assert "append_many -> LSNs 5..6\n" in out
    assert out.endswith("reopened: 6 records, last_lsn=6\n")


async def test_group_commit(tmp_path: Path) -> None:
    out = await run_example("group_commit", tmp_path / "log")
    assert re.search(r"^1000 concurrent appends: [\d.]+ ms, [\d,]+ records/s$", out, re.M), out
    assert re.search(r"^100 sequential appends: .* records/s", out, re.M), out
    assert "all 1000 returned LSNs are durable" in out.splitlines()[-1]
    async with walasync.open(tmp_path / "log") as wal:  # the example left a valid log
        assert wal.last_lsn == 1100
        assert [r.lsn async for r in wal.read()] == list(range(1, 1101))


async def test_kv_store_rebuilds_its_state_from_the_log(tmp_path: Path) -> None:
    first = await run_example("kv_store", tmp_path / "kv")
    assert first.startswith("replayed 0 records: {}\n")
    assert "  runs = 1\n" in first
    assert "  alice = 90\n  bob = 10\n" in first
    assert "scratch" not in first

    second = await run_example("kv_store", tmp_path / "kv")
    replayed = second.splitlines()[0]
    assert replayed.startswith("replayed 12 records: {")
    assert "'runs': '1'" in replayed
    assert "'greeting': 'hello from run 1'" in replayed
    assert "  runs = 2\n" in second
    assert "  greeting = hello from run 2\n" in second
    assert "  alice = 80\n  bob = 20\n" in second
    assert "  sensor4 = 24.5C\n" in second


async def test_crash_testing() -> None:
    out = await run_example("crash_testing")
    assert re.search(r"^\d+ power-loss images recovered: no acknowledged transfer lost", out, re.M)
