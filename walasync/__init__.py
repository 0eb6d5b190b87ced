"""walasync: an asyncio-native write-ahead log with group commit.

async with walasync.open("data/orders.wal") as wal:
    lsn = await wal.append(b"order 17 filled")   # durable when it returns
    async for record in wal.read(start=lsn):
        ...
"""

from ._io import FileIO as FileIO
from ._opener import Opener as Opener
from ._options import Durability as Durability
from ._options import Options as Options
from ._reader import Record as Record
from ._readonly import ReadOnlyWal as ReadOnlyWal
from ._stats import Histogram as Histogram
from ._stats import Stats as Stats
from ._store import SegmentInfo as SegmentInfo
from ._wal import Wal as Wal
from ._wal import open as open
from .errors import BrokenLogError as BrokenLogError
from .errors import ClosedError as ClosedError
from .errors import CorruptionError as CorruptionError
from .errors import DiskFullError as DiskFullError
from .errors import LockedError as LockedError
from .errors import RecordTooLargeError as RecordTooLargeError
from .errors import TruncatedError as TruncatedError
from .errors import UnsupportedFormatError as UnsupportedFormatError
from .errors import WalError as WalError
from .errors import WrongLoopError as WrongLoopError

__version__ = "0.1.0"

__all__ = (
    "BrokenLogError",
    "ClosedError",
    "CorruptionError",
    "DiskFullError",
    "Durability",
    "FileIO",
    "Histogram",
    "LockedError",
    "Opener",
    "Options",
    "ReadOnlyWal",
    "Record",
    "RecordTooLargeError",
    "SegmentInfo",
    "Stats",
    "TruncatedError",
    "UnsupportedFormatError",
    "Wal",
    "WalError",
    "WrongLoopError",
    "open",
)

for _name in (
    "Durability",
    "FileIO",
    "Histogram",
    "Opener",
    "Options",
    "ReadOnlyWal",
    "Record",
    "SegmentInfo",
    "Stats",
    "Wal",
):
    globals()[_name].__module__ = "walasync"
del _name
