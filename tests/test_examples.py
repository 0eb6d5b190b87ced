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
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

import walasync

ROOT = Path(walasync.__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
NAMES = ["crash_testing", "group_commit", "kv_store", "quickstart"]


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


async def test_kv_store_rebuilds_its_state_from_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    first = await run_main("kv_store", capsys, request, tmp_path / "kv")
    assert first.startswith("replayed 0 records: {}\n")
    assert "  runs = 1\n" in first
    assert "  alice = 90\n  bob = 10\n" in first
    assert "scratch" not in first

    second = await run_main("kv_store", capsys, request, tmp_path / "kv")
    replayed = second.splitlines()[0]
    assert replayed.startswith("replayed 12 records: {")
    assert "'runs': '1'" in replayed
    assert "'greeting': 'hello from run 1'" in replayed
    assert "  runs = 2\n" in second
    assert "  greeting = hello from run 2\n" in second
    assert "  alice = 80\n  bob = 20\n" in second
    assert "  sensor4 = 24.5C\n" in second


async def test_crash_testing(
    capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    out = await run_main("crash_testing", capsys, request)
    found = re.search(
        r"^(\d+) power-loss images recovered: no acknowledged transfer lost", out, re.M
    )
    assert found, out
    assert int(found.group(1)) > 30  # at least one image per transfer
