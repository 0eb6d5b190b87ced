"""Export the stats of open logs to Prometheus (`pip install 'walasync[prometheus]'`).

    from prometheus_client import REGISTRY, start_http_server
    from walasync.prometheus import WalCollector

    collector = WalCollector(wal)        # more logs: WalCollector(a, b), or collector.add(c)
    REGISTRY.register(collector)
    start_http_server(9100)

The collector reads `wal.stats()` when Prometheus scrapes (on the scraping thread), so it
costs the logs nothing between scrapes. Every series has a `path` label: the log's directory.
A closed log is dropped from the collector at the next scrape. One collector per registry:
two would export the same names. The metrics are listed in README.md, "Stats and metrics".
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ._stats import Histogram, Stats
from ._wal import Wal

__all__ = ("SECOND_BUCKETS", "WalCollector")

# The exported bucket bounds, a subset of the stats' own (which are 20 a decade): those of
# prometheus_client's default buckets, from 10 µs (an NVMe write) to 10 s.
SECOND_BUCKETS: tuple[float, ...] = (
    *(float(f"{m}e{e}") for e in range(-5, 1) for m in ("1", "2.5", "5")),
    10.0,
)
_RECORD_BUCKETS: tuple[float, ...] = tuple(float(4**k) for k in range(11))  # 1 .. 2**20

_COUNTERS = (
    ("appends", "append and append_many calls acknowledged"),
    ("records", "records acknowledged"),
    ("appended_bytes", "bytes of the records acknowledged (data only)"),
    ("batches", "batches written (group commits)"),
    ("slow_fsyncs", "durable writes that took longer than slow_sync_warning"),
)
_HISTOGRAMS = (
    ("batch_records", "records per batch", _RECORD_BUCKETS),
    ("append_duration_seconds", "append latency, from queued to acknowledged", SECOND_BUCKETS),
    ("fsync_duration_seconds", "durable write of a batch, or fdatasync", SECOND_BUCKETS),
)
_GAUGES = (
    ("pending_records", "records queued, not yet in a batch"),
    ("pending_bytes", "queued bytes, as counted against max_pending_bytes"),
    ("in_flight_records", "records in the batches being written"),
    ("waiting_appenders", "appenders waiting for room in the queue"),
    ("segments", "segment files"),
    ("disk_bytes", "size of the segment files"),
    ("first_lsn", "oldest LSN"),
    ("last_lsn", "highest acknowledged LSN"),
    ("synced_lsn", "highest LSN known fdatasync'd"),
    ("broken", "1 if a failed write or fdatasync broke the log"),
)


def _le(bound: float) -> str:
    """A bucket's `le` label, written as prometheus_client writes its own."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


def _counters(s: Stats) -> tuple[int, ...]:
    return (s.appends, s.records, s.appended_bytes, s.batches, s.slow_syncs)


def _histograms(s: Stats) -> tuple[Histogram, ...]:
    return (s.batch_records, s.append_seconds, s.sync_seconds)


def _gauges(s: Stats) -> tuple[float, ...]:
    return (
        *(s.pending_records, s.pending_bytes, s.in_flight_records, s.waiting_appenders),
        *(s.segments, s.disk_bytes, s.first_lsn, s.last_lsn, s.synced_lsn, float(s.broken)),
    )


class WalCollector(Collector):
    """A prometheus_client collector of the stats of the logs given (or `add`ed)."""

    def __init__(self, *wals: Wal) -> None:
        self._lock = threading.Lock()
        self._wals: list[Wal] = list(wals)

    def add(self, wal: Wal) -> None:
        """Export `wal` too (until it is closed)."""
        with self._lock:
            if wal not in self._wals:
                self._wals.append(wal)

    def remove(self, wal: Wal) -> None:
        """Stop exporting `wal` (nothing happens if it was not exported)."""
        with self._lock:
            if wal in self._wals:
                self._wals.remove(wal)

    def describe(self) -> Iterator[Metric]:
        """The metric families, without samples (so registering does not scrape)."""
        return self._families(())

    def collect(self) -> Iterator[Metric]:
        """The metric families, with a sample set per open log (read from `wal.stats()`)."""
        with self._lock:
            self._wals = [wal for wal in self._wals if not wal.closed]
            wals = list(self._wals)
        return self._families([wal.stats() for wal in wals])

    @staticmethod
    def _families(snapshots: Iterable[Stats]) -> Iterator[Metric]:
        snapshots = list(snapshots)
        for i, (name, doc) in enumerate(_COUNTERS):
            counter = CounterMetricFamily(f"walasync_{name}", doc, labels=["path"])
            for s in snapshots:
                counter.add_metric([s.path], _counters(s)[i])
            yield counter
        for i, (name, doc, bounds) in enumerate(_HISTOGRAMS):
            histogram = HistogramMetricFamily(f"walasync_{name}", doc, labels=["path"])
            for s in snapshots:
                h = _histograms(s)[i]
                buckets = [(_le(b), n) for b, n in h.cumulative(bounds)]
                histogram.add_metric([s.path], buckets, h.sum)
            yield histogram
        for i, (name, doc) in enumerate(_GAUGES):
            gauge = GaugeMetricFamily(f"walasync_{name}", doc, labels=["path"])
            for s in snapshots:
                gauge.add_metric([s.path], _gauges(s)[i])
            yield gauge
