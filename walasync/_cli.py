"""The `walasync` command: look at, check and repair a log from the shell.

Built on the public API only (`describe`, `verify`, `repair`, and a read-only `open` for
`dump`), with click for the commands and rich for tables and the progress bar; both come
with the `walasync[cli]` extra, and `walasync/__main__.py` says so if they are missing.
Expected failures print one line on stderr and exit with a code of their own (`EXIT`);
only a bug prints a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

import walasync

from ._dump import FORMATS, Dumper

__all__ = ("EXIT", "cli")

# Exit codes, one per kind of outcome (README, "Operating a log").
EXIT = {
    "ok": 0,
    "problem": 1,  # the log is damaged (verify), or a dump or repair stopped at damage
    "usage": 2,  # click's own, for bad options
    "missing": 3,  # no such directory
    "not-a-log": 4,
    "locked": 5,  # a writer holds the log (repair)
    "newer": 6,  # a format version this walasync cannot read
    "permission": 7,
    "io": 8,  # any other error reading or writing the files
    "no-cli": 9,  # click or rich missing (see __main__.py)
    # replicate, restore (_cli_replication.py):
    "no-nats": 10,  # nats-py missing
    "unreachable": 11,  # no NATS server (or JetStream) answers
    "auth": 12,  # credentials refused
    "no-stream": 13,
    "stream-config": 14,  # the stream's settings do not allow safe replication
    "stream-content": 15,  # the stream holds what is not this log's (another log, history)
    "too-large": 16,  # a record does not fit in one message (max_payload)
    "gap": 17,  # the log removed records before they were shipped
    "interrupted": 130,
    "terminated": 143,
    "broken-pipe": 141,  # stdout closed early (`| head`), as a SIGPIPE would end it
}
_BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_batching.py"
_PROGRESS_FROM = 64 << 20  # bytes: verify shows a bar on a terminal for logs this large


def _fail(command: str, message: str, code: str) -> NoReturn:
    click.echo(f"walasync {command}: {message}", err=True)
    sys.exit(EXIT[code])


@contextlib.contextmanager
def _errors(command: str, directory: str) -> Iterator[None]:
    """Turn every expected failure into one line on stderr and its exit code."""
    try:
        yield
    except walasync.NotALogError:
        _fail(command, f"{directory}: not a walasync log (no segment file, no META)", "not-a-log")
    except walasync.UnsupportedFormatError as exc:
        _fail(
            command,
            f"{exc.path}: a format this walasync ({walasync.__version__}) cannot read "
            f"({exc.reason}): upgrade walasync",
            "newer",
        )
    except walasync.LockedError:
        _fail(
            command,
            f"{directory}: a writer has the log open (its LOCK is held): stop it first",
            "locked",
        )
    except (walasync.CorruptionError, walasync.TruncatedError) as exc:
        _fail(command, str(exc), "problem")
    except walasync.WalError as exc:
        cause = exc.__cause__
        if isinstance(cause, (FileNotFoundError, NotADirectoryError)):
            what = cause.filename or directory
            if os.path.abspath(what) == os.path.abspath(directory):
                if isinstance(cause, NotADirectoryError):
                    _fail(command, f"{directory}: not a directory", "missing")
                _fail(command, f"{directory}: no such directory", "missing")
            _fail(command, f"{what}: no such file or directory", "missing")
        if isinstance(cause, PermissionError):
            _fail(command, f"{cause.filename or directory}: permission denied", "permission")
        _fail(command, str(exc), "io")
    except BrokenPipeError:
        # Whoever read stdout stopped (`| head`): leave quietly, and let nothing flush to
        # the closed pipe at exit.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT["broken-pipe"])
    except KeyboardInterrupt:
        click.echo("", err=True)
        sys.exit(EXIT["interrupted"])


def _size(n: int) -> str:
    if n < 1024:
        return f"{n:,} bytes"
    size, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while size >= 1024 and len(units) > 1:
        size /= 1024
        units.pop(0)
    return f"{size:,.1f} {units[0]}"


def _json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


directory_argument = click.argument("directory", type=click.Path(path_type=str, readable=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(walasync.__version__, prog_name="walasync", message="%(prog)s %(version)s")
def cli() -> None:
    """Look at, check, repair and replicate a walasync log (a directory of segment files).

    Every command but `repair` and `restore` only reads, and works while a writer runs.
    Exit codes: 0 sound, 1 damage found, 2 bad usage, 3 no such directory (or, for `bench`,
    no benchmarks beside this copy), 4 not a walasync log, 5 locked by a writer, 6 a newer
    format, 7 permission denied, 8 other I/O error, 9 the `walasync[cli]` extra missing;
    10-17 for replicate and restore; 130 interrupted, 141 output closed early (`| head`),
    143 terminated (README, "Operating a log").
    """


@cli.command()
@directory_argument
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
def info(directory: str, as_json: bool) -> None:
    """Describe the log: format, segments, LSN range, size, torn tail, writer.

    Reads segment headers and seals and scans only the last segment (as opening the log
    does); `verify` checks every batch.
    """
    with _errors("info", directory):
        log = walasync.describe(directory)
        if as_json:
            data = dataclasses.asdict(log)
            data["records"] = log.records
            _json(data)
        else:
            _print_info(log)


def _print_info(log: walasync.LogInfo) -> None:
    from rich.console import Console
    from rich.table import Table

    class PipedConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError  # `_errors` exits 141, as `dump` does (rich exits 1)

    console = PipedConsole(highlight=False, soft_wrap=True)
    versions = ", ".join(map(str, log.versions)) or "unknown"
    if log.torn_tail:
        what = "being written, or torn" if log.locked else "torn"
        tail = (
            f"{what}: {log.torn_tail:,} bytes after the last batch (never acknowledged; "
            "open cuts them)"
        )
    else:
        tail = "clean"
    rows = [
        ("log", log.path),
        ("format", f"version {versions}"),
        ("records", f"{log.records:,} (LSN {log.first_lsn} to {log.last_lsn})"),
        ("segments", f"{len(log.segments)}, {_size(log.bytes)} on disk"),
        ("tail", tail),
        ("writer", "running (it holds the lock)" if log.locked else "none (the lock is free)"),
        ("log id", log.log_id or "none (no META)"),
    ]
    if log.pending_cut:
        rows.append(("cut", f"interrupted truncate_back: LSN {log.pending_cut} on goes at open"))
    if log.other_files:
        rows.append(("other files", ", ".join(log.other_files) + " (not walasync's: ignored)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        console.print(f"{key:<{width}}  {value}")
    for problem in log.problems:
        console.print(f"problem: {problem}")
    table = Table(box=None, pad_edge=False, show_edge=False)
    table.add_column("segment")
    for column in ("first LSN", "last LSN", "size"):
        table.add_column(column, justify="right")
    table.add_column("state")
    table.add_column("format", justify="right")
    for s in log.segments:
        table.add_row(
            os.path.basename(s.path),
            str(s.first_lsn),
            str(s.last_lsn),
            f"{s.size:,}",
            s.state,
            str(s.version or "?"),
        )
    console.print()
    console.print(table)


@cli.command()
@directory_argument
@click.option("--from", "start", type=click.IntRange(min=1), help="First LSN (default: the first).")
@click.option("--to", "end", type=click.IntRange(min=1), help="Last LSN (default: the last).")
@click.option(
    "--format",
    "form",
    type=click.Choice(FORMATS),
    default="jsonl",
    show_default=True,
    help="raw: the bytes only; hex: hexdump; jsonl: one object per line; json: an array.",
)
def dump(directory: str, start: int | None, end: int | None, form: str) -> None:
    """Write the log's records to stdout, in LSN order, streaming (bounded memory).

    In JSON a record is {"lsn", "size", "data"} when it is UTF-8 text, and {"lsn", "size",
    "base64"} otherwise. Reads beside a running writer, up to its last record when the dump
    began. Stops at damage, after every record before it, and exits 1 naming the file and
    offset.
    """
    out = sys.stdout.buffer
    dumper = Dumper(out, form)

    async def run() -> int:
        """Dump; return the last LSN the read covered."""
        async with (
            walasync.open(directory, readonly=True) as log,
            contextlib.aclosing(log.read(start, end)) as records,
        ):
            async for rec in records:
                dumper.record(rec.lsn, rec.data)
            return log.last_lsn

    with _errors("dump", directory):
        try:
            last = asyncio.run(run())
        except (walasync.CorruptionError, walasync.TruncatedError):
            dumper.end()  # what came before the damage, complete (a closed JSON array)
            raise
        dumper.end()
        if end is None or end > last:
            # A reader beside a writer takes invalid bytes at the end for a batch being
            # written: only a check of what follows tells acknowledged records cut off.
            report = walasync.verify(directory, since=last + 1)
            problem = report.problem
            if problem is not None and (end is None or problem.lsn <= end):
                _fail(
                    "dump",
                    f"{problem} (records from LSN {problem.lsn} on do not read back: "
                    "`walasync repair` cuts the log there)",
                    "problem",
                )


@cli.command()
@directory_argument
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar on a terminal (default: for logs over 64 MiB).",
)
def verify(directory: str, as_json: bool, progress: bool | None) -> None:
    """Check every frame of every segment; exit 0 if the log is sound, 1 with the file
    and byte offset of the first problem otherwise.

    Sealed segments are checked too (opening the log does not read them). Read-only: it
    never changes a file, and works while a writer runs. A torn tail (a last batch never
    acknowledged, which open cuts) is not a problem.
    """
    with _errors("verify", directory):
        with _progress(progress) as bar:
            report = walasync.verify(directory, progress=bar)
        _print_verdict(report, as_json)
    sys.exit(EXIT["ok"] if report.ok else EXIT["problem"])


def _print_verdict(report: walasync.VerifyReport, as_json: bool) -> None:
    if as_json:
        data = dataclasses.asdict(report)
        data["ok"] = report.ok
        _json(data)
        return
    if report.problem is None:
        click.echo(
            f"ok: {report.segments} segments, {report.records:,} records (LSN "
            f"{report.first_lsn} to {report.last_lsn}), {report.bytes:,} bytes checked"
        )
    else:
        click.echo(f"damaged: {report.problem}")
        click.echo(
            f"records {report.first_lsn} to {report.last_lsn} read back; from LSN "
            f"{report.problem.lsn} on they do not. `walasync repair` cuts the log there."
        )
    for note in report.notes:
        click.echo(f"note: {note}")


@contextlib.contextmanager
def _progress(wanted: bool | None) -> Iterator[Callable[[int, int], object] | None]:
    """A progress callback drawing a rich bar on stderr, or None. Only on a terminal
    (stderr, and by default stdout too), and by default only for a large log."""
    if wanted is False or not sys.stderr.isatty() or (wanted is None and not sys.stdout.isatty()):
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    bar = Progress(
        "verifying",
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            if not wanted and total < _PROGRESS_FROM:
                return
            bar.start()
            task = bar.add_task("verify", total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        bar.stop()


@cli.command()
@directory_argument
@click.option("--dry-run", is_flag=True, help="Say what would be cut; change nothing.")
@click.option(
    "--backup",
    type=click.Path(path_type=str),
    help="Directory for the files it changes or removes (default: DIRECTORY/broken-<time>).",
)
def repair(directory: str, dry_run: bool, backup: str | None) -> None:
    """Cut the log at its first problem, so that it opens and verifies again.

    Refuses while a writer holds the log. What it removes is kept: every file it changes
    or removes is first copied (or hard-linked) into the backup directory, made durable,
    and only then is the cut committed; a crash at any point leaves the log as it was, or
    cut with the backup complete. Prints how many records and bytes were cut and the new
    last LSN.
    """
    with _errors("repair", directory):
        report = walasync.repair(directory, dry_run=dry_run, backup=backup)
        _print_repair(report)


def _print_repair(report: walasync.RepairReport) -> None:
    dry_run = report.dry_run
    if not report.repaired:
        click.echo(
            f"nothing to repair: the log verifies (LSN {report.first_lsn} to {report.last_lsn})"
        )
        return
    for problem, action in zip(report.problems, report.actions, strict=True):
        click.echo(f"damaged: {problem}")
        click.echo(f"{'would repair' if dry_run else 'repair'}: {action}")
    if dry_run:
        click.echo("nothing was changed (--dry-run)")
        return
    click.echo(f"backup: {report.backup} (every file changed or removed, as it was)")
    click.echo(
        f"the log now ends at LSN {report.last_lsn} (first LSN {report.first_lsn}), and verifies"
    )


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run the batching benchmark (benchmarks/bench_batching.py, same options; --help
    lists them).

    The benchmark ships with the source repository, not with the wheel: this runs it from
    the checkout walasync is installed from (pip install -e '.[bench]').
    """
    if not _BENCH.is_file():
        _fail(
            "bench",
            "the benchmark ships with the source repository, not the wheel: clone it and "
            "run `pip install -e '.[bench]'` there (then `walasync bench` runs "
            "benchmarks/bench_batching.py from it)",
            "missing",
        )
    if "-h" in args or "--help" in args:
        click.echo(f"walasync bench runs {_BENCH} with these options:\n")
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, str(_BENCH), *args])


# The replication commands, in their own module (they use the helpers above).
from ._cli_replication import replicate, restore  # noqa: E402

cli.add_command(replicate)
cli.add_command(restore)
