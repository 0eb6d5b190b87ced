"""A TCP service that answers a request only once it is in the log, and survives kill -9.

    python examples/tcp_service.py [DIR]               # the demo below (walasync installed,
                                                       # or PYTHONPATH=. in a checkout)
    python examples/tcp_service.py serve DIR [--port N]
    python examples/tcp_service.py load HOST PORT [--connections 256] [--duration 2]

The server (`asyncio.start_server`) speaks lines: `PUT key value` is answered `OK lsn` once
`await kv.append(key, value)` returned, so the request is durable (fdatasync'd) before the
client hears of it; `GET key` is answered `VALUE lsn value` (or `NONE`) from the keyed
log's index. Many connections' appends share each fdatasync (group commit).

The demo starts the server as a separate process on DIR (default: a temporary one), runs
the load client with 256 connections and prints the requests/s it sustained (both on uvloop
where it is installed); then loads it
again and kills the server with SIGKILL in the middle, restarts it, and checks that every
request the client saw acknowledged is in the log (read from the files, and asked of the
restarted server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import tempfile
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import walasync

T = TypeVar("T")

HOST = "127.0.0.1"


# -- the server --------------------------------------------------------------------------------


async def serve(
    path: str,
    port: int = 0,
    ready: asyncio.Future[int] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve the log in DIR `path` on `port` (0: any free port, given to `ready`) until
    `stop` is set (or SIGTERM, when run as a program)."""
    stop = stop or asyncio.Event()
    async with walasync.open_keyed(path) as kv:

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while line := await reader.readline():
                    command, _, rest = line.decode().rstrip("\n").partition(" ")
                    if command == "PUT":
                        key, _, value = rest.partition(" ")
                        lsn = await kv.append(key, value.encode())  # durable from here on
                        writer.write(b"OK %d\n" % lsn)
                    elif command == "GET":
                        rec = await kv.latest(rest)
                        if rec is None:
                            writer.write(b"NONE\n")
                        else:
                            writer.write(b"VALUE %d %s\n" % (rec.lsn, rec.value))
                    else:
                        writer.write(b"ERR unknown command\n")
                    await writer.drain()
            except (ConnectionError, walasync.ClosedError):
                pass  # the client went away, or the server is stopping: no reply owed
            finally:
                await _close(writer)

        server = await asyncio.start_server(handle, HOST, port, backlog=1024)
        async with server:
            if ready is not None:
                ready.set_result(server.sockets[0].getsockname()[1])
            await stop.wait()


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close a connection and wait for it, so that a reset peer's error is consumed (Python
    3.10 logs "Future exception was never retrieved" otherwise)."""
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


# -- the load client ---------------------------------------------------------------------------


async def load(
    port: int,
    connections: int,
    stop: asyncio.Event,
    acked: set[str],
    tag: str = "r",
    host: str = HOST,
    milestone: tuple[int, asyncio.Event] | None = None,
) -> None:
    """Each connection sends `PUT` requests one after another until `stop` is set or the
    server goes away; the key of every request answered `OK` goes into `acked`.
    `milestone` (n, event): the event is set once n requests were acknowledged."""

    async def connection(n: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            return
        try:
            i = 0
            while not stop.is_set():
                key = f"{tag}{n}.{i}"
                writer.write(f"PUT {key} payload of request {i} on connection {n}\n".encode())
                if not (await reader.readline()).startswith(b"OK "):
                    return  # the server is gone
                acked.add(key)
                if milestone is not None and len(acked) >= milestone[0]:
                    milestone[1].set()
                i += 1
        except OSError:
            return  # reset by a killed server
        finally:
            await _close(writer)

    await asyncio.gather(*(connection(n) for n in range(connections)))


async def get(port: int, keys: list[str]) -> dict[str, bytes | None]:
    """Ask the server for the values of `keys` over one connection."""
    reader, writer = await asyncio.open_connection(HOST, port)
    out: dict[str, bytes | None] = {}
    try:
        for key in keys:
            writer.write(f"GET {key}\n".encode())
            reply = (await reader.readline()).rstrip(b"\n")
            out[key] = None if reply == b"NONE" else reply.split(b" ", 2)[2]
    finally:
        await _close(writer)
    return out


async def throughput(
    port: int, connections: int, duration: float, tag: str, host: str = HOST
) -> set[str]:
    """Load the server for `duration` seconds and print the requests/s it sustained."""
    acked: set[str] = set()
    stop = asyncio.Event()
    task = asyncio.ensure_future(load(port, connections, stop, acked, tag, host))
    start = time.perf_counter()
    await asyncio.sleep(duration)
    stop.set()
    await task
    elapsed = time.perf_counter() - start
    print(
        f"{connections} connections: {len(acked):,} requests acknowledged in {elapsed:.1f} s, "
        f"{len(acked) / elapsed:,.0f} requests/s (each durable before its reply)"
    )
    return acked


async def keys_in_log(path: str) -> set[str | bytes]:
    """Every key in the log, read from its files (the server may be running)."""
    async with walasync.open(path, readonly=True) as log:
        return {walasync.KeyedRecord.from_record(r).key async for r in log.read()}


# -- the demo ----------------------------------------------------------------------------------


async def start_server_process(path: str) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "serve", path, "--port", "0", stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = (await proc.stdout.readline()).decode()
    if not line.startswith("listening on port "):
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, int(line.split()[-1])


async def crash(path: str, connections: int = 256, duration: float = 1.0) -> dict[str, int]:
    """Load a server process, SIGKILL it mid-load, restart it, and check that every
    acknowledged request is in the log. Returns the counts."""
    proc, port = await start_server_process(path)
    try:
        await throughput(port, connections, duration, "t")
        acked: set[str] = set()
        stop = asyncio.Event()
        busy = asyncio.Event()
        task = asyncio.ensure_future(load(port, connections, stop, acked, "k", HOST, (500, busy)))
        waiter = asyncio.ensure_future(busy.wait())  # mid-load: requests in flight
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        proc.kill()  # SIGKILL: no chance to flush or close anything
        await proc.wait()
        await task  # every connection ends as the server's socket dies
        print(f"killed the server with SIGKILL after {len(acked):,} acknowledged requests")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    proc, port = await start_server_process(path)
    try:
        in_log = await keys_in_log(path)
        missing = acked - in_log
        sample = random.Random(0).sample(sorted(acked), min(100, len(acked)))
        answers = await get(port, sample)
        lost = [k for k in sample if answers[k] is None]
        print(
            f"restarted: {len(in_log):,} records in the log; acknowledged but missing: "
            f"{len(missing)}; of {len(sample)} asked of the restarted server, unknown: {len(lost)}"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    return {
        "acked": len(acked),
        "missing": len(missing),
        "unknown": len(lost),
        "in_log": len(in_log),
    }


async def in_process(path: str, connections: int = 256, duration: float = 1.0) -> set[str]:
    """The server and the load client on this one event loop; returns the acknowledged
    keys (the server is stopped and the log closed when it returns)."""
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.ensure_future(serve(path, 0, ready, stop))
    try:
        port = await ready
        acked = await throughput(port, connections, duration, "p")
        answers = await get(port, sorted(acked)[:50])
        assert all(answers.values()), "an acknowledged request is unknown to the server"
    finally:
        stop.set()
        await server
    return acked


async def main(path: str, duration: float = 1.0) -> None:
    result = await crash(path, 256, duration)
    if result["missing"] or result["unknown"]:
        raise SystemExit("acknowledged requests were lost")


def run_server(path: str, port: int) -> None:
    async def server() -> None:
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.add_done_callback(lambda f: print(f"listening on port {f.result()}", flush=True))
        await serve(path, port, ready, stop)

    run(server())


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (its streams are about twice as fast here; the
    log runs on either loop alike), else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="run the server (SIGTERM stops it)")
    s.add_argument("dir")
    s.add_argument("--port", type=int, default=7070)
    c = sub.add_parser("load", help="load a running server and print requests/s")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--connections", type=int, default=256)
    c.add_argument("--duration", type=float, default=2.0)
    d = sub.add_parser("demo", help="the demo (the default)")
    d.add_argument("dir", nargs="?")
    d.add_argument("--duration", type=float, default=1.0)
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("serve", "load", "demo", "-h", "--help"):
        argv = ["demo", *argv]
    args = parser.parse_args(argv)
    if args.command == "serve":
        run_server(args.dir, args.port)
    elif args.command == "load":
        run(throughput(args.port, args.connections, args.duration, "l", args.host))
    elif args.dir:
        run(main(args.dir, args.duration))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(main(f"{tmp}/log", args.duration))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        cli()
