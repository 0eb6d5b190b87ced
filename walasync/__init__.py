"""walasync: an asyncio-native write-ahead log with group commit.

async with walasync.open("data/orders.wal") as wal:
    lsn = await wal.append(b"order 17 filled")   # durable when it returns
    async for record in wal.read(start=lsn):
        ...
"""

from importlib.machinery import EXTENSION_SUFFIXES as _EXTENSION_SUFFIXES

from . import _batcher
from ._inspect import LogInfo as LogInfo
from ._inspect import SegmentState as SegmentState
from ._inspect import describe as describe
from ._io import FileIO as FileIO
from ._keyed import KeyedLog as KeyedLog
from ._keyed import KeyedRecord as KeyedRecord
from ._keyed import open_keyed as open_keyed
from ._open import open as open
from ._opener import Opener as Opener
from ._options import Durability as Durability
from ._options import Options as Options
from ._reader import Batch as Batch
from ._reader import Record as Record
from ._readonly import ReadOnlyWal as ReadOnlyWal
from ._repair import RepairReport as RepairReport
from ._repair import repair as repair
from ._statelog import JSONSerializer as JSONSerializer
from ._statelog import Serializer as Serializer
from ._statelog import StateLog as StateLog
from ._stats import Histogram as Histogram
from ._stats import Stats as Stats
from ._store import SegmentInfo as SegmentInfo
from ._verify import Problem as Problem
from ._verify import VerifyReport as VerifyReport
from ._verify import verify as verify
from ._wal import Wal as Wal
from .errors import ApplyError as ApplyError
from .errors import BrokenLogError as BrokenLogError
from .errors import ClosedError as ClosedError
from .errors import CorruptionError as CorruptionError
from .errors import DiskFullError as DiskFullError
from .errors import LockedError as LockedError
from .errors import MalformedRecordError as MalformedRecordError
from .errors import NotALogError as NotALogError
from .errors import NothingToUndoError as NothingToUndoError
from .errors import RecordTooLargeError as RecordTooLargeError
from .errors import TruncatedError as TruncatedError
from .errors import UnsupportedFormatError as UnsupportedFormatError
from .errors import WalError as WalError
from .errors import WrongLoopError as WrongLoopError

__version__ = "0.1.0"

#: Whether the append path runs compiled (mypyc) rather than as pure Python: see README.md,
#: "Performance". Both behave the same; the compiled build is faster.
COMPILED: bool = _batcher.__file__.endswith(tuple(_EXTENSION_SUFFIXES))

__all__ = (
    "COMPILED",
    "ApplyError",
    "Batch",
    "BrokenLogError",
    "ClosedError",
    "CorruptionError",
    "DiskFullError",
    "Durability",
    "FileIO",
    "Histogram",
    "JSONSerializer",
    "KeyedLog",
    "KeyedRecord",
    "LockedError",
    "LogInfo",
    "MalformedRecordError",
    "NotALogError",
    "NothingToUndoError",
    "Opener",
    "Options",
    "Problem",
    "ReadOnlyWal",
    "Record",
    "RecordTooLargeError",
    "RepairReport",
    "SegmentInfo",
    "SegmentState",
    "Serializer",
    "StateLog",
    "Stats",
    "TruncatedError",
    "UnsupportedFormatError",
    "VerifyReport",
    "Wal",
    "WalError",
    "WrongLoopError",
    "describe",
    "open",
    "open_keyed",
    "repair",
    "verify",
)

for _name in (
    "Batch",
    "Durability",
    "FileIO",
    "JSONSerializer",
    "LogInfo",
    "Histogram",
    "KeyedLog",
    "KeyedRecord",
    "Opener",
    "Options",
    "Problem",
    "ReadOnlyWal",
    "Record",
    "RepairReport",
    "SegmentInfo",
    "Serializer",
    "StateLog",
    "SegmentState",
    "VerifyReport",
    "Stats",
    "Wal",
    "describe",
    "repair",
    "verify",
):
    globals()[_name].__module__ = "walasync"
del _name
