"""Options of an open log and the durability modes, validated once at open."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from . import _compress

__all__ = ("Durability", "Options")

KiB = 1024
MiB = 1024 * KiB


class Durability(str, enum.Enum):
    """When `append` returns, and so what an acknowledged record survives.

    - `FSYNC` (default): after the batch is written and fdatasync'd. Survives a process
      crash, an OS crash and power loss.
    - `INTERVAL`: after the batch is written to the OS; fdatasync runs every
      `sync_interval` seconds, on `sync()` and on `close()`. Survives a process crash;
      an OS crash or power loss can lose what was acknowledged since the last fdatasync.
    - `NONE`: after the batch is written to the OS; walasync never calls fdatasync except
      on `sync()`. Survives a process crash; the OS decides when data reaches the disk.
    """

    FSYNC = "fsync"
    INTERVAL = "interval"
    NONE = "none"


@dataclass(frozen=True)
class Options:
    """Tunables of an open log; see README.md, "Options"."""

    durability: Durability = Durability.FSYNC
    segment_size: int = 64 * MiB
    max_record_size: int = 16 * MiB
    max_batch_bytes: int = 4 * MiB
    max_batch_delay: float = 0.0
    max_pending_bytes: int = 64 * MiB
    sync_interval: float = 0.05
    retention_bytes: int | None = None
    retention_age: float | None = None
    compression: str | None = None
    compression_level: int = 1
    slow_sync_warning: float | None = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "durability", Durability(self.durability))
        for name in ("segment_size", "max_record_size", "max_batch_bytes", "max_pending_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        if self.segment_size < 4 * KiB:
            raise ValueError("segment_size must be at least 4096 bytes")
        if self.max_record_size > 0x7FFFFFFF - 64:
            raise ValueError("max_record_size must be below 2 GiB")
        for name in ("max_batch_delay", "sync_interval"):
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not 0 <= value < math.inf  # NaN too: a timer that never fires
            ):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        if self.sync_interval == 0:
            raise ValueError("sync_interval must be > 0")
        slow = self.slow_sync_warning
        if slow is not None and (
            not isinstance(slow, (int, float)) or isinstance(slow, bool) or not slow >= 0
        ):
            raise ValueError(f"slow_sync_warning must be a number >= 0 or None, not {slow!r}")
        for name in ("retention_bytes", "retention_age"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0
            ):
                raise ValueError(f"{name} must be a number > 0 or None, not {value!r}")
        _compress.check(self.compression, self.compression_level)
