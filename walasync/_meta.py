"""The log's small durable record of itself: identity, where it starts, a cut in progress.

`META` is rewritten whole, atomically (a temporary file written and fdatasync'd, renamed
over it, then the directory fsynced), so a crash leaves the old one or the new one. It is
the commit point of the operations that remove records: `truncate_front` raises
`first_lsn` here before deleting any file; `truncate_back` records its cut here (with the
bytes of the one batch it must rewrite) before touching any segment, and recovery finishes
a cut it finds. Pure encoding here; the file operations take an I/O layer.

    META (72 bytes, little-endian; a cut adds its batch after them)
      0  8    META_MAGIC
      8  u16  version (1)
     10  u16  flags (0)
     12  u32  cuts: how many truncate_back calls were committed, ever
     16  16   log id: random, chosen when the log is created, never changed
     32  u64  origin: the LSN the log was created to start at
     40  u64  first LSN: records below it are removed (truncate_front)
     48  u64  cut: 0, or records from this LSN on are being removed (truncate_back)
     56  u64  last cut: the first LSN the last committed truncate_back removed
     64  u32  cut offset: where the rewritten batch goes in the cut's segment
     68  u32  CRC32C of bytes 0..68 and of everything after byte 72
    then, during a cut, the rewritten batch (header and padded payload), possibly empty

A reader in another process (read-only opening) learns from "cuts" and "last cut" that the
writer cut the log back since it last looked (`Meta.cut_since`: after more than one cut,
the lower ones are unknown, and it assumes the lowest possible).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, replace

from crc32c import crc32c

from ._io import FileIO, read_file, replace_file

__all__ = (
    "META_NAME",
    "TMP_NAME",
    "Meta",
    "MetaError",
    "MetaVersionError",
    "read_meta",
    "write_meta",
)

META_NAME = "META"
TMP_NAME = META_NAME + ".tmp"  # what `replace_file` writes first
_MAGIC = b"WALAMETA"
_VERSION = 1
_HEAD = struct.Struct("<8sHHI16sQQQQI")
_CRC = struct.Struct("<I")
SIZE = _HEAD.size + _CRC.size
assert SIZE == 72


class MetaError(Exception):
    """META is damaged or of an unknown version (mapped to CorruptionError)."""


class MetaVersionError(MetaError):
    """META is intact but of a version this code cannot read (UnsupportedFormatError)."""


@dataclass(frozen=True)
class Meta:
    """What META says."""

    log_id: bytes
    origin: int
    first_lsn: int
    cut: int = 0  # 0, or the first LSN a truncate_back in progress removes
    cut_offset: int = 0
    cut_batch: bytes = b""
    cuts: int = 0  # truncate_back calls committed, ever
    last_cut: int = 0  # the first LSN the last of them removed

    def with_(self, **changes: object) -> Meta:
        return replace(self, **changes)  # type: ignore[arg-type]

    def cut_since(self, before: Meta) -> int:
        """The lowest LSN that the truncate_back calls committed between `before` and this
        META may have removed; 0 if there was none.

        After one, its cut (`last_cut`). After more than one, META names only the last, so
        the lowest any of them could have removed: `before.first_lsn` (a cut never removes
        below the first LSN, which never goes down). If the log is not the one `before`
        described (another identity, or fewer cuts), 1.
        """
        if (before.log_id and self.log_id != before.log_id) or self.cuts < before.cuts:
            return 1
        if self.cuts == before.cuts:
            return 0
        if self.cuts == before.cuts + 1:
            return self.last_cut
        return max(before.first_lsn, 1)

    def encode(self) -> bytes:
        head = _HEAD.pack(
            _MAGIC,
            _VERSION,
            0,
            self.cuts,
            self.log_id,
            self.origin,
            self.first_lsn,
            self.cut,
            self.last_cut,
            self.cut_offset,
        )
        return head + _CRC.pack(crc32c(self.cut_batch, crc32c(head))) + self.cut_batch

    @classmethod
    def decode(cls, data: bytes) -> Meta:
        if len(data) < SIZE:
            raise MetaError("META is incomplete")
        magic, version, _f, cuts, log_id, origin, first, cut, last, offset = _HEAD.unpack_from(data)
        if magic != _MAGIC:
            raise MetaError("META is not walasync's (bad magic)")
        (crc,) = _CRC.unpack_from(data, _HEAD.size)
        if crc != crc32c(data[SIZE:], crc32c(data[: _HEAD.size])):
            raise MetaError("META checksum mismatch")
        if version != _VERSION:
            raise MetaVersionError(f"META version {version}; this walasync reads {_VERSION}")
        return cls(log_id, origin, first, cut, offset, bytes(data[SIZE:]), cuts, last)


def read_meta(io: FileIO, directory: str) -> Meta | None:
    """The log's META, or None if it has none (a log made before META existed, or a
    writer killed before it wrote the first one).

    Raises:
        MetaError: it is damaged.
    """
    data = read_file(io, os.path.join(directory, META_NAME))
    if data is None:
        return None
    return Meta.decode(data)


def write_meta(io: FileIO, directory: str, meta: Meta) -> None:
    """Replace META with `meta`, atomically and durably."""
    replace_file(io, directory, META_NAME, [meta.encode()])
