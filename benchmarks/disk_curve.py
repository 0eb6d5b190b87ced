"""What one durable write costs on this disk, by size: the ceiling of any group commit.

For writes of k records (k = 1 .. 512) into a file whose blocks are already written (a
recycled segment, a ring), one ``pwritev(RWF_DSYNC)`` per write, the median time per write
and the records/s that gives. Pipelined group commit (two batches in flight, so that the
loop's work overlaps the disk's) splits N closed-loop appenders into two cohorts of about
N/2, one per batch; a single writer that never waits for its callers (the ``raw`` row of
bench_batching.py) writes all N per write. The ratio of the two rates at k = N/2 and k = N
is the most walasync can reach against ``raw`` at N appenders on this disk, whatever its
own cost per record::

    python benchmarks/disk_curve.py [--size 4096] [--dir DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

KS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
FILE = 64 << 20


def per_write(fd: int, k: int, size: int, writes: int) -> float:
    """Median seconds per durable write of `k` records of `size` bytes (one buffer)."""
    buf = os.urandom(size) * k
    flag = getattr(os, "RWF_DSYNC", 0)
    times = []
    offset = 0
    for _ in range(writes):
        if offset + len(buf) > FILE:
            offset = 0
        t0 = time.perf_counter()
        if flag:
            os.pwritev(fd, [buf], offset, flag)
        else:  # pragma: no cover - not Linux
            os.pwritev(fd, [buf], offset)
            os.fdatasync(fd)
        times.append(time.perf_counter() - t0)
        offset += len(buf)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="record size in bytes")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure")
    parser.add_argument("--repeats", type=int, default=5, help="rounds over every k")
    parser.add_argument("--writes", type=int, default=200, help="writes per k per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "curve")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, bytes(FILE), 0)  # written blocks, as a recycled segment's
            os.fsync(fd)
            rounds: dict[int, list[float]] = {k: [] for k in KS}
            for _ in range(args.repeats):  # interleaved: drift hits every k alike
                for k in KS:
                    rounds[k].append(per_write(fd, k, args.size, args.writes))
        finally:
            os.close(fd)
    cost = {k: statistics.median(v) for k, v in rounds.items()}
    print(f"# durable write of k records of {args.size} B into written blocks (RWF_DSYNC)")
    print(f"{'k':>5} {'us/write':>9} {'records/s':>11} {'MB/s':>7}")
    for k in KS:
        rate = k / cost[k]
        print(f"{k:>5} {cost[k] * 1e6:>9.0f} {rate:>11,.0f} {rate * args.size / 1e6:>7.0f}")
    print("# ceiling vs raw at N appenders (two cohorts of N/2 vs one write of N):")
    for n in (16, 64, 256, 1024):
        if n // 2 in cost and n in cost:
            ratio = (n // 2 / cost[n // 2]) / (n / cost[n])
            print(f"#   N={n}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
