"""Statistics of an open log: counters and fixed-bucket histograms, read as one snapshot.

Theory of operation. Nothing here runs per append. The batcher counts on the event loop once
per batch (records, bytes, appends, the batch's size) and once per chunk of woken appenders
(their latency: see `Batcher._woken`); the appender times each durable write on the I/O
thread (one clock pair per batch). Each counter has one writing thread; `Wal.stats()` copies
them from any thread without a lock, so a snapshot's fields may be up to a batch apart.

Histograms have fixed log-scale buckets, so their memory is bounded whatever the run length:
seconds from 1 µs to 100 s on the R20 preferred numbers (1, 1.12, 1.25, 1.4, 1.6, ... 9, 10:
twenty buckets a decade, each 11-14% wide), records from 1 to 2**20 four a doubling
(1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ...: each 14-25% wide). Quantiles are read
from the buckets by interpolating (geometrically) inside the one that holds them, so a
quantile is within one bucket's width of the truth for the values counted. A value above
the last bound lands in an overflow bucket, whose quantiles read as the last bound.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate

__all__ = ("RECORD_BOUNDS", "SECOND_BOUNDS", "Buckets", "Histogram", "Stats")

_R20 = "1 1.12 1.25 1.4 1.6 1.8 2 2.24 2.5 2.8 3.15 3.55 4 4.5 5 5.6 6.3 7.1 8 9".split()

# Upper bounds (inclusive) of the buckets, ascending; each histogram has one bucket more,
# for the values above the last bound. Written as decimals, so that they print as such.
SECOND_BOUNDS: tuple[float, ...] = (
    *(float(f"{m}e{e}") for e in range(-6, 2) for m in _R20),
    100.0,
)
RECORD_BOUNDS: tuple[float, ...] = tuple(  # 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ...
    sorted({float(-(-m * 2**k // 4)) for k in range(20) for m in (4, 5, 6, 7)} | {2.0**20})
)


@dataclass(frozen=True, repr=False)
class Histogram:
    """A distribution as counts in fixed buckets: `counts[i]` values were at most
    `bounds[i]` (and above `bounds[i - 1]`); the last count is of values above every bound.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        """How many values were counted."""
        return sum(self.counts)

    @property
    def mean(self) -> float | None:
        """The exact mean (from the sum), or None if nothing was counted."""
        count = self.count
        return self.sum / count if count else None

    def quantile(self, q: float) -> float | None:
        """The value below which a share `q` (0 to 1) of the counted values lie, read from
        the buckets (within one bucket's width); None if nothing was counted.

        Raises:
            ValueError: `q` is outside 0..1.
        """
        if not 0 <= q <= 1:
            raise ValueError(f"a quantile must be in 0..1, not {q!r}")
        count = self.count
        if not count:
            return None
        rank = max(q * count, 1e-9)  # q = 0: the smallest value's bucket
        seen = i = 0
        while seen + self.counts[i] < rank:
            seen += self.counts[i]
            i += 1
        n = self.counts[i]
        if i == len(self.bounds):  # the overflow bucket: no upper bound known
            return self.bounds[-1]
        upper = self.bounds[i]
        lower = self.bounds[i - 1] if i else 0.0
        share = (rank - seen) / n
        return lower * (upper / lower) ** share if lower > 0 else upper * share

    def cumulative(self, bounds: tuple[float, ...] | None = None) -> list[tuple[float, int]]:
        """(bound, how many values were at most it) for each of `bounds` (default: all; each
        must be one of this histogram's), then (inf, the total): Prometheus's buckets."""
        running = list(accumulate(self.counts))
        picked = self.bounds if bounds is None else bounds
        where = {b: i for i, b in enumerate(self.bounds)}
        return [(b, running[where[b]]) for b in picked] + [(float("inf"), running[-1])]

    def __repr__(self) -> str:
        if not self.count:
            return "Histogram(count=0)"
        p50, p99, p999 = (self.quantile(q) for q in (0.5, 0.99, 0.999))
        return (
            f"Histogram(count={self.count}, mean={self.mean:.3g}, p50={p50:.3g}, "
            f"p99={p99:.3g}, p999={p999:.3g})"
        )


class Buckets:
    """The counts behind a `Histogram`, updated in place by one thread."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def add(self, value: float) -> None:
        """Count one value."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def spread(self, low: float, high: float, n: int) -> None:
        """Count `n` values known to lie evenly between `low` and `high`: each bucket gets
        the share of them that its part of the range holds."""
        if n <= 0:
            return
        bounds, counts = self.bounds, self.counts
        self.sum += (low + high) / 2 * n
        i = bisect_left(bounds, low)
        j = bisect_left(bounds, high)
        if i == j:
            counts[j] += n
            return
        scale = n / (high - low)
        given = 0
        for k in range(i, j):
            upto = int((bounds[k] - low) * scale + 0.5)  # of the n, those at most bounds[k]
            counts[k] += upto - given
            given = upto
        counts[j] += n - given

    def snapshot(self) -> Histogram:
        return Histogram(self.bounds, tuple(self.counts), self.sum)


@dataclass(frozen=True)
class Stats:
    """A snapshot of an open log's activity and state, from `Wal.stats()`.

    Counters run from the log's open (not across restarts) and count acknowledged work
    only: a batch that failed counts nowhere. See README.md, "Stats and metrics".
    """

    path: str  # the log's directory
    appends: int  # `append` and `append_many` calls acknowledged
    records: int  # records acknowledged (an `append_many` counts each of its records)
    appended_bytes: int  # bytes of those records (the data only)
    batches: int  # batches written: group commits, each one write (and fdatasync)
    batch_records: Histogram  # records per batch
    append_seconds: Histogram  # an append's wait, from its record queued to its LSN given
    sync_seconds: Histogram  # each durable write of a batch, or fdatasync, on the I/O thread
    slow_syncs: int  # of those, how many took longer than `slow_sync_warning`
    pending_records: int  # queued, not yet in a batch
    pending_bytes: int  # queued bytes, as counted against `max_pending_bytes`
    in_flight_records: int  # in the batches being written
    waiting_appenders: int  # appenders waiting for room in the queue (backpressure)
    segments: int  # segment files
    disk_bytes: int  # their size, preallocated room included (see README: "Stats and metrics")
    first_lsn: int
    last_lsn: int
    synced_lsn: int
    closed: bool  # close() has begun
    failure: BaseException | None  # what broke the log (a write or fdatasync), if it broke

    @property
    def broken(self) -> bool:
        """Whether a failed write or fdatasync broke the log (it then refuses appends)."""
        return self.failure is not None

    @property
    def records_per_batch(self) -> float | None:
        """The mean batch size, or None before the first batch."""
        return self.records / self.batches if self.batches else None

    @property
    def append_p50(self) -> float | None:
        """Median append latency, in seconds (see `append_seconds`)."""
        return self.append_seconds.quantile(0.5)

    @property
    def append_p99(self) -> float | None:
        return self.append_seconds.quantile(0.99)

    @property
    def append_p999(self) -> float | None:
        return self.append_seconds.quantile(0.999)
