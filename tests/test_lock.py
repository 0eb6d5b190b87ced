"""The log's lock: one open `Wal` per directory, across this process and every other.

The lock is an flock on the directory's LOCK file, so the kernel drops it when the holder's
file is closed or its process dies, even by SIGKILL; and the file is opened O_CLOEXEC, so
programs the holder starts do not inherit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
from conftest import segment_files, until

import walasync

ROOT = Path(walasync.__file__).resolve().parent.parent
WAIT = 30.0

# Tries to open the log in argv[1]; prints "opened LAST_LSN" or the error's type name.
PROBE = """
import asyncio, sys, walasync

async def main():
    try:
        async with walasync.open(sys.argv[1]) as wal:
            print("opened", wal.last_lsn)
    except walasync.WalError as exc:
        print(type(exc).__name__)

asyncio.run(main())
"""

# Opens the log in argv[1], appends a record, starts a long-lived child program (which
# must not inherit the lock), prints "held LSN CHILD_PID" and waits to be killed.
HOLDER = """
import asyncio, subprocess, sys, walasync

async def main():
    wal = await walasync.open(sys.argv[1])
    lsn = await wal.append(b"written by the holder")
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    print("held", lsn, child.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def subprocess_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


async def spawn(script: str, log_dir: Path) -> asyncio.subprocess.Process:
    """Run `script` on `log_dir` in another Python process, its output piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(log_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )


async def probe(log_dir: Path) -> str:
    """What another process gets when it opens the log: "opened N" or an error type name."""
    proc = await spawn(PROBE, log_dir)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, err.decode()
    assert not err, err.decode()
    return out.decode().strip()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def fd_targets(fds: set[str]) -> list[str]:
    """What the file descriptors are open on (those closed meanwhile are left out)."""
    targets = []
    for fd in sorted(fds):
        with contextlib.suppress(FileNotFoundError):
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return targets


def other_names(log_dir: Path, tmp_path: Path) -> list[Path]:
    """Other paths to the directory `log_dir`: a symlink, a detour, a relative path."""
    link = tmp_path / "link"
    link.symlink_to(log_dir)
    return [link, log_dir / ".." / log_dir.name, Path(os.path.relpath(log_dir))]


async def try_open(log_dir: Path) -> walasync.Wal | None:
    """The opened log, or None if it is locked."""
    try:
        return await walasync.open(log_dir)
    except walasync.LockedError:
        return None


async def test_second_opener_in_this_process_is_locked_out(log_dir: Path) -> None:
    async with walasync.open(log_dir, segment_size=4096) as wal:
        await wal.append(b"first")
        with pytest.raises(walasync.LockedError):
            await walasync.open(log_dir)
        with pytest.raises(walasync.LockedError):
            async with walasync.open(log_dir):
                pytest.fail("opened a locked log")  # pragma: no cover
        # The failed openers disturbed nothing: appends go on, across rotations too.
        for i in range(60):
            await wal.append(b"%d" % i * 50)
        assert len(segment_files(log_dir)) > 1
        assert wal.last_lsn == 61
    async with walasync.open(log_dir) as wal:
        assert wal.last_lsn == 61
        assert [r.data async for r in wal.read(end=1)] == [b"first"]


async def test_lock_holds_for_other_paths_to_the_same_directory(
    log_dir: Path, tmp_path: Path
) -> None:
    async with walasync.open(log_dir):
        for other in other_names(log_dir, tmp_path):
            with pytest.raises(walasync.LockedError):
                await walasync.open(other)


async def test_concurrent_openers_exactly_one_wins(log_dir: Path) -> None:
    results = await asyncio.gather(
        *(asyncio.ensure_future(walasync.open(log_dir)) for _ in range(8)),
        return_exceptions=True,
    )
    wals = [r for r in results if isinstance(r, walasync.Wal)]
    errors = [r for r in results if not isinstance(r, walasync.Wal)]
    for wal in wals:
        await wal.close()
    assert len(wals) == 1, results
    assert all(isinstance(e, walasync.LockedError) for e in errors), errors


async def test_locked_out_openers_leak_nothing(log_dir: Path) -> None:
    async with walasync.open(log_dir):
        fds, threads = open_fds(), threading.active_count()
        for _ in range(30):
            with pytest.raises(walasync.LockedError):
                await walasync.open(log_dir)
        # The open log's own zeroing thread may open its last segment meanwhile (once the
        # disk has been calm for a while, which on a loaded machine can fall in this loop).
        new = fd_targets(open_fds() - fds)
        assert all(Path(t).parent == log_dir and t.endswith(".wal") for t in new), new
        # Each failed opener's I/O thread exits on its own.
        await until(lambda: threading.active_count() <= threads, "the openers' threads to exit")


async def test_other_process_is_locked_out_until_close(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        await wal.append_many([b"a", b"b"])
        assert await probe(log_dir) == "LockedError"
        assert await wal.append(b"c") == 3  # still ours
    assert await probe(log_dir) == "opened 3"
    async with walasync.open(log_dir) as wal:  # and the probe let it go again
        assert wal.last_lsn == 3


async def test_sigkill_of_the_holder_releases_the_lock(log_dir: Path) -> None:
    holder = await spawn(HOLDER, log_dir)
    assert holder.stdout is not None and holder.stderr is not None
    child = 0
    try:
        line = await asyncio.wait_for(holder.stdout.readline(), WAIT)
        fields = line.split()
        assert fields[:2] == [b"held", b"1"], line + await holder.stderr.read()
        child = int(fields[2])
        with pytest.raises(walasync.LockedError):
            await walasync.open(log_dir)
        assert await probe(log_dir) == "LockedError"

        holder.kill()
        assert await asyncio.wait_for(holder.wait(), WAIT) == -signal.SIGKILL
        os.kill(child, 0)  # the holder's child lives on, and holds no lock
        async with walasync.open(log_dir) as wal:
            assert [r async for r in wal.read()] == [(1, b"written by the holder")]
            assert await wal.append(b"after the holder") == 2
        assert await probe(log_dir) == "opened 2"
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
        await holder.communicate()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


async def test_failed_recovery_releases_the_lock(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        for i in range(3):  # one batch each
            await wal.append(b"record %d" % i)
    (segment,) = segment_files(log_dir)
    with segment.open("r+b") as f:  # a byte of the first batch's payload: not a torn tail
        f.seek(32 + 24 + 4)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    for _ in range(2):
        with pytest.raises(walasync.CorruptionError):
            await walasync.open(log_dir)
    assert await probe(log_dir) == "CorruptionError"


async def test_cancelled_open_releases_the_lock(log_dir: Path) -> None:
    fds, threads = open_fds(), threading.active_count()
    for delay in (0, 0.0005, 0.002, 0.01):  # before the open starts, and while it runs
        opener = asyncio.ensure_future(walasync.open(log_dir))
        await asyncio.sleep(delay)
        opener.cancel()
        await asyncio.wait([opener])
        if not opener.cancelled():
            await opener.result().close()
        for _ in range(500):  # a Store opened on the thread after the cancel is closed there
            wal = await try_open(log_dir)
            if wal is not None:
                await wal.close()
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail(f"the log stayed locked after an open cancelled after {delay} s")
    # What the cancelled openers opened is closed on their threads.
    await until(lambda: open_fds() == fds, "the cancelled openers' files to be closed")
    await until(lambda: threading.active_count() <= threads, "the openers' threads to exit")
