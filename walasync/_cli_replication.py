"""`walasync replicate` and `walasync restore`: a log to a NATS JetStream stream and back,
from the shell (`walasync.jetstream`).

`replicate` reads the log through a read-only opening with `durable_only=True`: it takes
no lock, so it ships a log that a service writes in another process (a sidecar) as well as
a closed one, and it passes on only what is durable on the local disk (it fdatasyncs what
it reads). A `Replicator` in the writer's own process can do more (veto retention of
unshipped segments, wait for the stream in `append`); this one only ships.

nats-py comes with `walasync[nats]` and is imported only when one of these commands runs;
without it they say so in one line (exit code 10). Each replication error has its exit
code (`_cli.EXIT`); SIGINT and SIGTERM stop a command cleanly (its log closed) with 130
and 143.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NoReturn

import click

import walasync

from ._cli import EXIT, _errors

__all__ = ("replicate", "restore")

_PROGRESS_EVERY = 1.0  # seconds between progress lines
directory_argument = click.argument("directory", type=click.Path(path_type=str, readable=False))


def _fail(command: str, message: str, code: str) -> NoReturn:
    click.echo(f"walasync {command}: {' '.join(message.split())}", err=True)
    sys.exit(EXIT[code])


def _need_nats(command: str) -> None:
    try:
        import nats  # noqa: F401 - imported by walasync.jetstream; checked here, once
    except ImportError:
        _fail(command, "needs nats-py: pip install 'walasync[nats]'", "no-nats")


@contextlib.contextmanager
def _replication_errors(command: str, servers: list[str], stream: str) -> Iterator[None]:
    """Turn the replication errors into one line on stderr and their exit codes (the log's
    own errors go on to `_cli._errors`)."""
    import nats.errors

    from . import jetstream as wj

    where = ", ".join(servers)
    try:
        yield
    except wj.AuthError as exc:
        _fail(command, f"{where}: {exc}: pass --creds FILE, or user:password@ in the URL", "auth")
    except wj.ConnectError:
        _fail(command, f"no NATS server reachable at {where}", "unreachable")
    except wj.StreamNotFoundError:
        hint = " (pass --create to create it)" if command == "replicate" else ""
        _fail(command, f"stream {stream!r} does not exist on {where}{hint}", "no-stream")
    except wj.StreamConfigError as exc:
        _fail(command, str(exc), "stream-config")
    except wj.StreamContentError as exc:
        _fail(command, str(exc), "stream-content")
    except wj.MessageTooLargeError as exc:
        _fail(command, str(exc), "too-large")
    except wj.ReplicationGapError as exc:
        _fail(command, f"{exc} (ship the log to a new stream)", "gap")
    except ValueError as exc:  # --resume-from beyond the log
        _fail(command, str(exc), "usage")
    except nats.errors.NoRespondersError:
        _fail(command, f"{where}: no JetStream answers (is JetStream enabled?)", "unreachable")
    except nats.errors.Error as exc:
        _fail(command, f"{where}: {exc}", "unreachable")


def _run(main: Callable[[], Awaitable[None]]) -> int | None:
    """Run `main` until it returns, or until SIGINT or SIGTERM cancels it; the signal."""
    stopped: list[int] = []

    async def guarded() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def stop(sig: int) -> None:
            stopped.append(sig)
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        try:
            await main()
        except asyncio.CancelledError:
            if not stopped:
                raise
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    asyncio.run(guarded())
    return stopped[0] if stopped else None


def _exit_for(sig: int | None) -> None:
    """Exit as the signal that stopped the command asks (nothing if none did)."""
    if sig is not None:
        sys.exit(EXIT["interrupted"] if sig == signal.SIGINT else EXIT["terminated"])


@contextlib.asynccontextmanager
async def _progress(value: Callable[[], int], line: Callable[[], str]) -> AsyncIterator[None]:
    """Print `line()` every `_PROGRESS_EVERY` seconds in which `value()` changed."""

    async def report() -> None:
        shown = value()
        while True:
            await asyncio.sleep(_PROGRESS_EVERY)
            if value() != shown:
                shown = value()
                click.echo(line())

    task = asyncio.ensure_future(report())
    try:
        yield
    finally:
        task.cancel()


@contextlib.contextmanager
def _retries_shown(command: str) -> Iterator[None]:
    """Show the replication's transient failures (retried) on stderr; the failure that
    stops it is the command's own one-line error."""
    logger = logging.getLogger("walasync.jetstream")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"walasync {command}: %(message)s"))
    handler.addFilter(lambda record: record.levelno < logging.ERROR)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _servers(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    urls = [url.strip() for url in value.split(",") if url.strip()]
    if not urls:
        raise click.BadParameter("no server URL")
    return urls


servers_option = click.option(
    "--servers",
    envvar="NATS_URL",
    required=True,
    callback=_servers,
    metavar="URL[,URL]",
    help="NATS servers (default: $NATS_URL); user:password@ or token@ in a URL authenticates.",
)
stream_option = click.option("--stream", required=True, help="The JetStream stream's name.")
subject_option = click.option(
    "--subject", help="The stream's one subject (default: walasync.<stream>)."
)
creds_option = click.option(
    "--creds",
    envvar="NATS_CREDS",
    type=click.Path(dir_okay=False, path_type=str),
    help="A NATS user credentials file (default: $NATS_CREDS).",
)


def _connect_options(creds: str | None) -> dict[str, Any]:
    return {"user_credentials": creds} if creds else {}


@click.command()
@directory_argument
@servers_option
@stream_option
@subject_option
@click.option("--follow", is_flag=True, help="Keep shipping new records until Ctrl-C.")
@click.option("--create", is_flag=True, help="Create the stream if it does not exist.")
@click.option(
    "--replicas",
    type=click.IntRange(1, 5),
    default=3,
    show_default=True,
    help="Replicas the stream must have (and gets, with --create).",
)
@click.option("--max-bytes", type=click.IntRange(min=1), help="With --create: the stream's limit.")
@click.option(
    "--max-age", type=click.FloatRange(min=0, min_open=True), help="With --create: seconds."
)
@click.option(
    "--duplicate-window",
    type=click.FloatRange(min=10),
    default=120.0,
    show_default=True,
    help="Seconds (with --create); an existing stream's must be at least 10.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.001),
    default=0.05,
    show_default=True,
    help="Seconds between looks at the log for new records.",
)
@click.option(
    "--resume-from",
    type=click.IntRange(min=1),
    metavar="LSN",
    help="Where to go on when the stream is empty (purged, or aged out by max_age): the LSN "
    "after the last one it held. Ignored when the stream has messages.",
)
@creds_option
def replicate(
    directory: str,
    servers: list[str],
    stream: str,
    subject: str | None,
    follow: bool,
    create: bool,
    replicas: int,
    max_bytes: int | None,
    max_age: float | None,
    duplicate_window: float,
    poll_interval: float,
    resume_from: int | None,
    creds: str | None,
) -> None:
    """Ship the log in DIRECTORY to a JetStream stream, from where the stream ends.

    Takes no lock: the log may be written by a service in another process (records are
    shipped once durable on this disk: it fdatasyncs what it reads), or closed. Without
    --follow it ships every record the log holds when it starts, waits for the stream's
    acknowledgement, and exits 0; with --follow it goes on shipping new records until
    Ctrl-C (exit 130) or SIGTERM (143). One shipper per stream.
    """
    _need_nats("replicate")
    from . import jetstream as wj

    state = {"acked": 0, "begin": 0}  # for the last line

    async def ship() -> None:
        async with walasync.open(
            directory, readonly=True, durable_only=True, poll_interval=poll_interval
        ) as log:
            rep = wj.Replicator(
                log,
                servers,
                stream=stream,
                subject=subject,
                create=create,
                replicas=replicas,
                max_bytes=max_bytes,
                max_age=max_age,
                duplicate_window=duplicate_window,
                connect_options=_connect_options(creds),
                resume_from=resume_from,
            )
            async with rep:
                state["begin"] = state["acked"] = rep.acked_lsn
                target = log.last_lsn
                click.echo(
                    f"replicating {directory} (LSN {log.first_lsn} to {target}) to stream "
                    f"{stream}: it holds up to LSN {rep.acked_lsn}"
                    + ("; following new records (Ctrl-C stops)" if follow else "")
                )
                try:
                    async with _progress(
                        lambda: rep.acked_lsn,
                        lambda: f"acknowledged up to LSN {rep.acked_lsn} ({rep.lag:,} behind)",
                    ):
                        while follow or rep.acked_lsn < target:
                            # Returns at each acknowledgement; raises what stops `rep`.
                            await rep.wait(rep.acked_lsn + 1 if follow else target)
                finally:
                    state["acked"] = rep.acked_lsn

    with _errors("replicate", directory), _replication_errors("replicate", servers, stream):
        with _retries_shown("replicate"):
            sig = _run(ship)
    shipped = state["acked"] - state["begin"]
    verb = "stopped" if sig is not None else "done"
    click.echo(
        f"{verb}: stream {stream} holds {directory} up to LSN {state['acked']} "
        f"({shipped:,} records shipped now)"
    )
    _exit_for(sig)


@click.command()
@directory_argument
@servers_option
@stream_option
@subject_option
@click.option("--follow", is_flag=True, help="Go on applying new messages until Ctrl-C.")
@creds_option
def restore(
    directory: str,
    servers: list[str],
    stream: str,
    subject: str | None,
    follow: bool,
    creds: str | None,
) -> None:
    """Rebuild the log in DIRECTORY from a JetStream stream, or bring it up to date.

    A new log gets the source's LSNs from the stream's first; an existing one (a replica
    restored before) continues after its last record, once the stream's message holding
    that record is found to hold the same records. Every message is checked (the log's
    identity, its checksum, LSN continuity). With --follow it then runs as a hot standby,
    applying each new message as it comes, until Ctrl-C (exit 130) or SIGTERM (143). It
    holds the log's lock while it runs.
    """
    _need_nats("restore")
    from . import jetstream as wj

    applied = [0]

    def on_apply(first: int, last: int) -> None:
        applied[0] = last

    async def pull() -> None:
        if follow:
            click.echo(f"restoring {directory} from stream {stream}, then following (Ctrl-C stops)")
        async with _progress(lambda: applied[0], lambda: f"applied up to LSN {applied[0]}"):
            await wj.restore(
                servers,
                stream,
                directory,
                subject=subject,
                follow=follow,
                connect_options=_connect_options(creds),
                on_apply=on_apply,
            )

    with _errors("restore", directory), _replication_errors("restore", servers, stream):
        with _retries_shown("restore"):
            sig = _run(pull)
        try:
            log = walasync.describe(directory)
        except walasync.WalError:
            if sig is None:
                raise
            click.echo(f"stopped: nothing restored into {directory}")
            _exit_for(sig)
    verb = "stopped" if sig is not None else "restored"
    click.echo(
        f"{verb}: {directory} holds {log.records:,} records of stream {stream} "
        f"(LSN {log.first_lsn} to {log.last_lsn})"
    )
    _exit_for(sig)
