"""The `walasync` command, run in a subprocess on real logs: good, torn, bit-flipped in a
sealed segment, truncated mid-header, with a foreign file, empty, missing, unreadable, of a
newer format, locked by a writer, and beside a running writer.

Sync tests: the command runs as a user runs it (`python -m walasync ...`, `cli`) for exit
codes, messages and what reaches the files; details of the output (formats, help texts)
are checked in this process through click's runner (`invoke`), which is far cheaper than a
new interpreter. The logs are written with the library first.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import itertools
import json
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import run, segment_files
from crc32c import crc32c

import walasync
from walasync import _cli
from walasync._format import READABLE_VERSIONS

SETPRIV = shutil.which("setpriv")


def cli(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run `python -m walasync ARGS` and capture what it prints."""
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "walasync", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def invoke(*args: object) -> Result:
    """Run the command in this process (click's test runner); exit code and output."""
    return CliRunner().invoke(_cli.cli, [str(a) for a in args])


def failed(result: subprocess.CompletedProcess[str] | Result, code: int, *words: str) -> str:
    """Check that the command failed with `code` and one line on stderr, no traceback."""
    returncode = result.exit_code if isinstance(result, Result) else result.returncode
    assert returncode == code, (returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("walasync "), result.stderr
    for word in words:
        assert word in line, line
    return line


def data(i: int) -> bytes:
    return b"rec-%d|" % i + bytes(i % 40)


def make_log(path: Path, n: int, segment_size: int = 4096, unit: int = 1) -> list[bytes]:
    """A closed log of `n` records (of `data`), appended `unit` at a time; returns them."""

    async def write() -> None:
        async with walasync.open(path, segment_size=segment_size) as wal:
            for i in range(1, n + 1, unit):
                await wal.append_many([data(j) for j in range(i, min(i + unit, n + 1))])

    run("asyncio", write())
    return [data(i) for i in range(1, n + 1)]


def read_back(path: Path) -> list[walasync.Record]:
    async def read() -> list[walasync.Record]:
        async with walasync.open(path) as wal:
            return [r async for r in wal.read()]

    return run("asyncio", read())


def files(path: Path) -> dict[str, bytes]:
    """Every file of the directory and its bytes (to show that nothing changed)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def jsonl(out: str) -> list[tuple[int, bytes]]:
    rows = [json.loads(line) for line in out.splitlines()]
    return [
        (r["lsn"], r["data"].encode() if "data" in r else base64.b64decode(r["base64"]))
        for r in rows
    ]


def batches(segment: Path) -> tuple[list[int], int]:
    """The offsets of a segment's batches, and the end of its data."""
    raw, offsets, pos = segment.read_bytes(), [], 32
    while raw[pos : pos + 4] == b"WLB1":
        offsets.append(pos)
        pos += 24 + (struct.unpack_from("<I", raw, pos + 8)[0] + 7) // 8 * 8
    return offsets, pos


def flip(path: Path, offset: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def reader_error(path: Path) -> walasync.CorruptionError:
    """The error a plain read of the whole log meets: where `verify` must point."""

    async def read() -> walasync.CorruptionError:
        async with walasync.open(path, readonly=True) as wal:
            with pytest.raises(walasync.CorruptionError) as info:
                async for _ in wal.read():
                    pass
        return info.value

    return run("asyncio", read())


@pytest.fixture
def good(tmp_path: Path) -> tuple[Path, list[bytes]]:
    log = tmp_path / "log"
    return log, make_log(log, 200)


# -- help, version, the extra --------------------------------------------------------------


def test_help_on_every_command_and_the_version() -> None:
    assert cli("--version").stdout.strip() == f"walasync {walasync.__version__}"
    for command in ([], ["info"], ["dump"], ["verify"], ["repair"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and result.stdout.startswith("Usage: "), result.output
    bench = cli("bench", "--help")  # the benchmark's own options
    assert bench.returncode == 0 and "--concurrency" in bench.stdout, bench.stderr


def test_importing_walasync_does_not_import_the_command_libraries() -> None:
    code = "import sys, walasync; print(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "walasync" in out and "click" not in out and "rich" not in out


@pytest.mark.parametrize("missing", ["click", "rich"])
def test_without_the_cli_extra_the_command_says_what_to_install(missing: str) -> None:
    code = (
        f"import sys; sys.modules[{missing!r}] = None; sys.argv = ['walasync', 'info', '.']; "
        "from walasync.__main__ import main; main()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 9 and "Traceback" not in result.stderr
    assert "pip install 'walasync[cli]'" in result.stderr and missing in result.stderr


def test_bench_runs_the_batching_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = cli(
        "bench",
        *("--impl", "walasync-asyncio", "--sizes", "100", "--concurrency", "4"),
        *("--many-sizes", "", "--duration", "0.2", "--warmup", "0", "--repeats", "1"),
        *("--dir", tmp_path, "--json", out),
    )
    assert result.returncode == 0, result.stderr
    assert "walasync-asyncio" in out.read_text()


def test_bench_with_its_default_implementations(tmp_path: Path) -> None:
    """Every implementation the README's first command runs (no --impl): it once refused
    to start, asking for the --baseline that only walasync-baseline needs."""
    out = tmp_path / "bench.json"
    result = cli(
        "bench",
        *("--sizes", "100", "--concurrency", "2", "--many-sizes", ""),
        *("--duration", "0.05", "--warmup", "0", "--repeats", "1"),
        *("--dir", tmp_path, "--json", out),
    )
    assert result.returncode == 0, result.stderr
    ran = {cell["impl"] for cell in json.loads(out.read_text())["cells"] if not cell["skipped"]}
    assert {"walasync-uvloop", "walasync-asyncio", "raw", "per-record"} <= ran
    assert "walasync-baseline" not in ran


def test_bench_outside_a_source_checkout_says_where_it_is(tmp_path: Path) -> None:
    package = Path(walasync.__file__).parent
    shutil.copytree(package, tmp_path / "walasync", ignore=shutil.ignore_patterns("__pycache__"))
    for runtime in package.parent.glob("*__mypyc*"):  # a compiled build's shared runtime
        shutil.copy(runtime, tmp_path)
    result = cli("bench", cwd=tmp_path)  # this copy has no benchmarks/ beside it
    failed(result, 3, "ships with the source repository")


# -- a good log ----------------------------------------------------------------------------


def test_a_good_log(good: tuple[Path, list[bytes]]) -> None:
    log, records = good
    before = files(log)
    info = json.loads(invoke("info", log, "--json").stdout)
    assert (info["first_lsn"], info["last_lsn"], info["records"]) == (1, 200, 200)
    assert info["versions"] == [2] and info["torn_tail"] == 0 and not info["locked"]
    segments = info["segments"]
    assert len(segments) == len(segment_files(log)) > 2
    assert [s["state"] for s in segments] == ["sealed"] * (len(segments) - 1) + ["active"]
    assert all(a["last_lsn"] + 1 == b["first_lsn"] for a, b in itertools.pairwise(segments))
    assert segments[-1]["last_lsn"] == 200
    assert info["bytes"] >= sum(p.stat().st_size for p in segment_files(log))

    result = cli("verify", log)
    assert result.returncode == 0 and result.stdout.startswith("ok:"), result.stdout
    assert "200 records" in result.stdout
    assert jsonl(cli("dump", log).stdout) == list(enumerate(records, 1))
    repaired = invoke("repair", log)
    assert repaired.exit_code == 0 and repaired.stdout.startswith("nothing to repair")
    assert files(log) == before  # no backup, no change: every command left it as it was


def test_the_output_formats(good: tuple[Path, list[bytes]]) -> None:
    log, records = good
    text = invoke("info", log).stdout
    assert "200 (LSN 1 to 200)" in text and "clean" in text and "none" in text
    assert "00000000000000000001.wal" in text and "active" in text
    part = json.loads(invoke("dump", log, "--from", 50, "--to", 60, "--format", "json").stdout)
    assert [(r["lsn"], r["data"].encode()) for r in part] == list(enumerate(records, 1))[49:60]
    assert invoke("dump", log, "--format", "raw").stdout_bytes == b"".join(records)
    hexed = invoke("dump", log, "--from", 7, "--to", 7, "--format", "hex").stdout
    assert hexed.splitlines() == [
        f"LSN 7: {len(records[6])} bytes",
        "  00000000  72 65 63 2d 37 7c 00 00  00 00 00 00 00           |rec-7|.......|",
    ]
    assert jsonl(invoke("dump", log, "--from", 199).stdout) == [
        (199, records[198]),
        (200, records[199]),
    ]
    report = json.loads(invoke("verify", log, "--json").stdout)
    assert report["ok"] is True and report["records"] == 200 and report["problem"] is None


def test_binary_records_in_json(tmp_path: Path) -> None:
    async def write() -> None:
        async with walasync.open(tmp_path) as wal:
            await wal.append_many([b"\xff\x00binary", "tëxt".encode(), b""])

    run("asyncio", write())
    rows = [json.loads(line) for line in invoke("dump", tmp_path).stdout.splitlines()]
    assert rows == [
        {"lsn": 1, "size": 8, "base64": base64.b64encode(b"\xff\x00binary").decode()},
        {"lsn": 2, "size": 5, "data": "tëxt"},
        {"lsn": 3, "size": 0, "data": ""},
    ]


def test_a_log_with_truncation_and_recycled_segments(tmp_path: Path) -> None:
    """META's first LSN, segments recycled by retention, indexes in the seals."""
    log = tmp_path / "log"

    async def write() -> tuple[int, int]:
        async with walasync.open(log, segment_size=4096, retention_bytes=12_000) as wal:
            for i in range(1, 251, 5):
                await wal.append_many([data(j) for j in range(i, i + 5)])
            await wal.truncate_front(wal.first_lsn + 5)
            return wal.first_lsn, wal.last_lsn

    first, last = run("asyncio", write())
    assert first > 100
    info = json.loads(invoke("info", log, "--json").stdout)
    assert (info["first_lsn"], info["last_lsn"]) == (first, last)
    assert cli("verify", log).returncode == 0
    assert jsonl(invoke("dump", log).stdout) == [(i, data(i)) for i in range(first, last + 1)]
    failed(invoke("dump", log, "--from", first - 1), 1, "truncated")


# -- damage --------------------------------------------------------------------------------


def test_a_torn_tail_is_reported_and_left_to_open(tmp_path: Path) -> None:
    log = tmp_path / "log"
    records = make_log(log, 10)
    last = segment_files(log)[-1]
    _, end = batches(last)
    raw = bytearray(last.read_bytes())
    raw[end : end + 32] = b"\x57\x4c\x42\x31" + b"\xee" * 28  # a torn batch
    last.write_bytes(bytes(raw))
    before = files(log)
    info = json.loads(invoke("info", log, "--json").stdout)
    assert info["torn_tail"] == 32 and info["last_lsn"] == 10
    result = cli("verify", log)
    assert result.returncode == 0 and "torn" in result.stdout, result.stdout
    assert jsonl(invoke("dump", log).stdout) == list(enumerate(records, 1))
    assert files(log) == before  # read-only, all three


def test_a_bit_flipped_in_a_sealed_segment(good: tuple[Path, list[bytes]]) -> None:
    log, records = good
    second = segment_files(log)[1]
    flip(second, 32 + 24 + 100)  # in the payload of a batch of the second segment
    error = reader_error(log)
    where = f"{error.path}: offset {error.offset}"
    lost = int(error.reason.split()[2].rstrip(","))  # "expected LSN N, found ..."
    before = files(log)

    assert invoke("info", log).exit_code == 0  # info does not read sealed segments' batches
    result = cli("verify", log)
    assert result.returncode == 1 and where in result.stdout, (where, result.stdout)
    assert f"from LSN {lost} on" in result.stdout

    dumped = cli("dump", log)
    failed(dumped, 1, where)
    assert jsonl(dumped.stdout) == list(enumerate(records, 1))[: lost - 1]

    dry = invoke("repair", log, "--dry-run")
    assert dry.exit_code == 0 and "nothing was changed" in dry.stdout, dry.output
    assert files(log) == before

    result = cli("repair", log)
    assert result.returncode == 0, result.stderr
    assert f"from LSN {lost} on ({200 - lost + 1} records," in result.stdout, result.stdout
    assert f"now ends at LSN {lost - 1}" in result.stdout
    backup = next(log.glob("broken-*"))
    saved = files(backup)
    changed = {name for name in before if files(log).get(name) != before[name]}
    assert changed and all(saved[name] == before[name] for name in changed), changed
    assert invoke("verify", log).exit_code == 0
    assert read_back(log) == [walasync.Record(i, d) for i, d in enumerate(records[: lost - 1], 1)]


def test_a_corrupt_tail_that_open_refuses_is_cut(tmp_path: Path) -> None:
    """Invalid bytes before valid batches in the last segment (what a power loss in
    INTERVAL or NONE mode can leave): open raises; repair cuts there."""
    log = tmp_path / "log"
    records = make_log(log, 20)
    last = segment_files(log)[-1]
    offsets, _ = batches(last)
    flip(last, offsets[-3] + 30)  # the third batch from the end
    with pytest.raises(walasync.CorruptionError):
        read_back(log)
    verdict = invoke("verify", log)
    assert verdict.exit_code == 1 and f"{last}: offset {offsets[-3]}" in verdict.stdout
    # A read-only reader takes the damage for a batch being written and stops there;
    # dump does not pass that off as the end of the log.
    dumped = cli("dump", log)
    failed(dumped, 1, f"{last}: offset {offsets[-3]}", "from LSN 18 on")
    assert jsonl(dumped.stdout) == list(enumerate(records, 1))[:17]
    assert jsonl(invoke("dump", log, "--to", 17).stdout) == list(enumerate(records, 1))[:17]
    failed(invoke("dump", log, "--to", 18), 1, "from LSN 18 on")
    result = cli("repair", log)
    assert result.returncode == 0 and "(3 records," in result.stdout, result.stdout
    assert read_back(log) == [walasync.Record(i, d) for i, d in enumerate(records[:17], 1)]


def test_a_last_segment_truncated_mid_header(good: tuple[Path, list[bytes]]) -> None:
    log, records = good
    last = segment_files(log)[-1]
    first = int(last.stem)
    original = last.read_bytes()
    last.write_bytes(original[:10])
    with pytest.raises(walasync.CorruptionError):
        read_back(log)
    info = json.loads(invoke("info", log, "--json").stdout)
    assert info["segments"][-1]["state"] == "damaged" and info["problems"]
    assert (info["last_lsn"], info["records"]) == (first - 1, first - 1)
    result = cli("verify", log)
    assert result.returncode == 1 and f"{last}: offset 0" in result.stdout, result.stdout
    dumped = cli("dump", log)  # every record before the damaged segment, then the error
    failed(dumped, 1, f"{last}: offset 0", f"from LSN {first} on")
    assert jsonl(dumped.stdout) == list(enumerate(records, 1))[: first - 1]
    result = cli("repair", log)
    assert result.returncode == 0 and f"now ends at LSN {first - 1}" in result.stdout, result
    assert f"from LSN {first} on (0 records, 10 bytes)" in result.stdout, result.stdout
    assert files(next(log.glob("broken-*")))[last.name] == original[:10]
    assert walasync.verify(log).ok

    async def reopen() -> tuple[list[walasync.Record], int]:
        async with walasync.open(log) as wal:
            return [r async for r in wal.read()], await wal.append(b"next")

    kept, lsn = run("asyncio", reopen())
    assert kept == [walasync.Record(i, d) for i, d in enumerate(records[: first - 1], 1)]
    assert lsn == first


def test_a_lost_last_segment(good: tuple[Path, list[bytes]]) -> None:
    """The last segment gone, the one before it sealed: every record before, then the
    error (a reader takes the sealed segment for the end of the log)."""
    log, records = good
    *_, previous, last = segment_files(log)
    first = int(last.stem)
    last.unlink()
    dumped = cli("dump", log, "--format", "json")  # a complete JSON array, all the same
    failed(dumped, 1, f"{previous}: offset", "segment missing", f"from LSN {first} on")
    rows = [(r["lsn"], r["data"].encode()) for r in json.loads(dumped.stdout)]
    assert rows == list(enumerate(records, 1))[: first - 1]
    assert invoke("verify", log).exit_code == 1


def test_a_file_named_like_a_segment_that_is_not_one(good: tuple[Path, list[bytes]]) -> None:
    """Garbage under a segment's name after the last segment: no record was ever in it,
    and none is counted as cut."""
    log, records = good
    last = segment_files(log)[-1]
    garbage = log / f"{10_000:020d}.wal"
    garbage.write_bytes(bytes(range(100)))
    info = json.loads(invoke("info", log, "--json").stdout)
    assert (info["last_lsn"], info["records"]) == (200, 200)
    assert [s["last_lsn"] for s in info["segments"][-2:]] == [200, 9999]
    assert info["segments"][-1]["state"] == "damaged"
    dumped = cli("dump", log)
    line = failed(dumped, 1, f"{last}: offset", "from LSN 201 on")
    assert jsonl(dumped.stdout) == list(enumerate(records, 1))
    offset = int(line.split("offset ")[1].split(":")[0])
    size = last.stat().st_size
    result = cli("repair", log)
    assert result.returncode == 0, result.stderr
    cut = f"from LSN 201 on (0 records, {size - offset + 100:,} bytes)"
    assert cut in result.stdout, result.stdout
    assert walasync.verify(log).ok and read_back(log)[-1].lsn == 200


def test_a_foreign_file_in_the_directory(good: tuple[Path, list[bytes]]) -> None:
    log, records = good
    (log / "notes.txt").write_text("not a segment")
    (log / "archive").mkdir()
    info = json.loads(cli("info", log, "--json").stdout)
    assert info["other_files"] == ["archive", "notes.txt"] and info["records"] == 200
    assert invoke("verify", log).exit_code == 0
    assert invoke("repair", log).stdout.startswith("nothing to repair")
    assert "notes.txt" in invoke("info", log).stdout
    assert jsonl(invoke("dump", log).stdout) == list(enumerate(records, 1))


COMMANDS = ("info", "dump", "verify", "repair")


def test_a_directory_without_a_log(tmp_path: Path) -> None:
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    failed(cli("dump", tmp_path / "foreign"), 4, "not a walasync log")
    failed(cli("repair", tmp_path / "empty"), 4, "not a walasync log")
    for command in COMMANDS:
        for path in (tmp_path / "foreign", tmp_path / "empty"):
            failed(invoke(command, path), 4, "not a walasync log")
    assert os.listdir(tmp_path / "foreign") == ["notes.txt"]  # not even a LOCK file
    assert os.listdir(tmp_path / "empty") == []


def test_a_log_without_records(tmp_path: Path) -> None:
    log = tmp_path / "log"
    make_log(log, 0)
    info = json.loads(invoke("info", log, "--json").stdout)
    assert (info["records"], info["first_lsn"], info["last_lsn"]) == (0, 1, 0)
    assert cli("verify", log).returncode == 0
    assert invoke("dump", log, "--format", "json").stdout == "[]\n"
    assert invoke("dump", log).stdout == ""


def test_a_missing_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    failed(cli("verify", tmp_path / "nothing"), 3, "no such directory")
    for command in COMMANDS:
        failed(invoke(command, tmp_path / "nothing"), 3, "nothing: no such directory")
        failed(invoke(command, tmp_path / "file"), 3, "file: not a directory")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_log_of_a_newer_format(good: tuple[Path, list[bytes]]) -> None:
    log, _ = good
    last = segment_files(log)[-1]
    raw = bytearray(last.read_bytes())
    newer = max(READABLE_VERSIONS) + 1
    raw[8:10] = struct.pack("<H", newer)
    raw[28:32] = struct.pack("<I", crc32c(bytes(raw[:28])))
    last.write_bytes(bytes(raw))
    before = files(log)
    failed(cli("repair", log), 6, f"format version {newer}", "upgrade walasync")
    for command in COMMANDS:
        failed(invoke(command, log), 6, f"format version {newer}", "upgrade walasync")
    assert files(log) == before


def test_a_newer_meta(good: tuple[Path, list[bytes]]) -> None:
    log, _ = good
    meta = bytearray((log / "META").read_bytes())
    meta[8:10] = struct.pack("<H", 2)
    meta[68:72] = struct.pack("<I", crc32c(bytes(meta[:68])))
    (log / "META").write_bytes(bytes(meta))
    for command in COMMANDS:
        failed(invoke(command, log), 6, "META version 2")
    failed(cli("info", log), 6, "META version 2")


def test_a_damaged_meta_is_rebuilt(good: tuple[Path, list[bytes]]) -> None:
    log, records = good
    flip(log / "META", 20)  # inside the log id
    info = invoke("info", log)
    assert info.exit_code == 0 and "META checksum mismatch" in info.stdout, info.output
    verdict = invoke("verify", log)
    assert verdict.exit_code == 1 and f"{log / 'META'}: offset 0" in verdict.stdout
    result = cli("repair", log)
    assert result.returncode == 0 and "rebuild META" in result.stdout, result
    assert read_back(log) == [walasync.Record(i, d) for i, d in enumerate(records, 1)]


def cli_unprivileged(*args: object) -> subprocess.CompletedProcess[str]:
    """`cli`, where file permissions apply: as root, without the capabilities that let
    root ignore them (setpriv drops them from the bounding set before the exec)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if SETPRIV is None:
            pytest.skip("running as root without setpriv: permissions cannot be denied")
        prefix = [SETPRIV, "--bounding-set=-dac_override,-dac_read_search"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "walasync", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_permission_denied(good: tuple[Path, list[bytes]]) -> None:
    log, _ = good
    for target, commands in (
        (log, ["dump", "repair", "info"]),
        (segment_files(log)[0], ["verify", "info"]),
    ):
        mode = target.stat().st_mode
        target.chmod(0)
        try:
            for command in commands:
                failed(cli_unprivileged(command, log), 7, "permission denied")
        finally:
            target.chmod(mode)


@pytest.fixture
def locked(good: tuple[Path, list[bytes]]) -> Iterator[Path]:
    """The good log, with its lock held as a writer holds it."""
    log, _ = good
    fd = os.open(log / "LOCK", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield log
    finally:
        os.close(fd)


def test_a_locked_log_is_read_but_not_repaired(locked: Path) -> None:
    before = files(locked)
    assert json.loads(cli("info", locked, "--json").stdout)["locked"] is True
    assert cli("verify", locked).returncode == 0
    failed(cli("repair", locked), 5, "writer")
    failed(invoke("repair", "--dry-run", locked), 5, "writer")
    assert "running" in invoke("info", locked).stdout
    assert len(invoke("dump", locked).stdout.splitlines()) == 200
    assert files(locked) == before


# -- streaming -------------------------------------------------------------------------------


def test_dump_into_a_pipe_closed_early(tmp_path: Path) -> None:
    log = tmp_path / "log"
    make_log(log, 3000, segment_size=1 << 20, unit=100)  # far more than a pipe buffers
    with subprocess.Popen(
        [sys.executable, "-m", "walasync", "dump", log, "--format", "hex"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith(b"LSN 1:")
        proc.stdout.close()  # `| head -n 1`
        stderr = proc.stderr.read()
        assert proc.wait(timeout=60) == 128 + signal.SIGPIPE
    assert stderr == b""


@pytest.mark.parametrize("command", ["info", "verify", "dump"])
def test_output_to_a_closed_pipe(good: tuple[Path, list[bytes]], command: str) -> None:
    """A reader gone before the first line (`| head -0`): exit 141, as a SIGPIPE would
    end it, not 1 (damage found), and no traceback."""
    log, _ = good
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "walasync", command, str(log)],
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (128 + signal.SIGPIPE, b"")


def peak_rss(args: Sequence[object]) -> int:
    """Peak RSS in KiB of a command run with its output thrown away."""
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen([sys.executable, "-m", "walasync", *map(str, args)], stdout=devnull)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0
    return usage.ru_maxrss


def test_dump_streams_a_log_in_bounded_memory(tmp_path: Path) -> None:
    """A 100 MiB log dumps in far less memory than it holds (fails if dump gathers the
    records first, or reads a segment whole)."""
    log = tmp_path / "log"
    record = b"x" * (64 << 10)

    async def write() -> None:
        async with walasync.open(log) as wal:
            for _ in range(100):
                await wal.append_many([record] * 16)

    run("asyncio", write())
    base = peak_rss(["info", log])
    grew = (peak_rss(["dump", log, "--format", "raw"]) - base) >> 10
    assert grew < 48, f"dump grew RSS by {grew} MiB for a 100 MiB log"


def test_read_only_commands_beside_a_running_writer(tmp_path: Path) -> None:
    """verify, info and dump while a writer appends and rotates: sound, and no error."""
    log = tmp_path / "log"

    async def main() -> list[tuple[str, int, str]]:
        results: list[tuple[str, int, str]] = []
        async with walasync.open(log, segment_size=8192) as wal:
            stop = asyncio.Event()

            async def writer() -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    await wal.append(data(i))

            task = asyncio.ensure_future(writer())
            try:
                for command in ("verify", "info", "dump"):
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable,
                        *("-m", "walasync", command, str(log)),
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE,
                    )
                    out, err = await proc.communicate()
                    assert proc.returncode is not None
                    results.append((command, proc.returncode, (out + err).decode()))
            finally:
                stop.set()
                await task
            assert wal.last_lsn > 100
        return results

    for command, code, output in run("asyncio", main()):
        assert code == 0, (command, output)
        assert "Traceback" not in output


def on_a_terminal(*args: object) -> tuple[int, bytes]:
    """Run the command with stdout and stderr on a pseudo-terminal: (exit code, output)."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "walasync", *map(str, args)],
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, "TERM": "xterm", "COLUMNS": "100"},
    )
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 1 << 16)
        except OSError:  # EIO: the command is gone and the terminal closed
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    return proc.wait(timeout=60), out


def test_verify_draws_a_progress_bar_only_on_a_terminal(
    good: tuple[Path, list[bytes]], tmp_path: Path
) -> None:
    log, _ = good
    code, out = on_a_terminal("verify", log, "--progress")
    assert code == 0 and b"verifying" in out and b"ok:" in out, out
    code, out = on_a_terminal("verify", log)  # a small log: no bar
    assert code == 0 and b"verifying" not in out, out
    large = tmp_path / "large"  # 64 MiB on disk (one segment, preallocated): a bar
    make_log(large, 10, segment_size=64 << 20)
    code, out = on_a_terminal("verify", large)
    assert code == 0 and b"verifying" in out and b"ok:" in out, out
    piped = cli("verify", log, "--progress")  # forced, but not a terminal: nothing drawn
    assert piped.returncode == 0 and piped.stderr == ""
