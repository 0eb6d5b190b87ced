"""The on-disk format: segment headers and batch frames. Pure functions, no I/O.

A segment file is a 32-byte header followed by batch frames, each padded to 8 bytes, then
zeros (the preallocated remainder), or in a recycled segment what the file held before (its
old frames, which the new salt and their lower LSNs keep from validating).

    segment header (32 bytes, little-endian)
      0  8    SEGMENT_MAGIC
      8  u16  format version
     10  u16  flags (0)
     12  u32  salt: random per segment, mixed into every batch checksum of the segment
     16  u64  LSN of the first record
     24  u32  the salt the file had before (a recycled segment), or 0
     28  u32  CRC32C of bytes 0..28

A batch frame holds every record of one group commit:

    batch header (24 bytes, little-endian)
      0  u32  BATCH_MAGIC, or ZSTD_MAGIC for a compressed batch (format 3)
      4  u32  CRC32C of the segment's salt (4 bytes), bytes 8..24 of this header, then the
              payload; for a compressed batch, of its magic (4 bytes) first
      8  u32  payload length in bytes (unpadded)
     12  u32  record count (at least 1)
     16  u64  LSN of the first record
    payload
      count x u32   record lengths; in format 2 the top bit (UNIT_JOINED) marks a record
                  whose `append_many` unit goes on with the next record
      the records' bytes, concatenated
    zero padding to a multiple of 8 bytes

A compressed batch (ZSTD_MAGIC) stores as its payload one zstd frame of the payload above
(length table and records), declaring its content size; the length field is the frame's
size, the count and LSN are the records'. The checksum covers the stored (compressed)
bytes, so the walk over batches, recovery and torn-tail repair never decompress: records
are expanded only where they are decoded (`expand`), bounded by the record count times
`max_record_size` and by `_compress.MAX_EXPANDED`. Covering the magic as well keeps a
damaged magic from turning one kind of batch into the other. Only segments of format
version 3 (ZSTD_VERSION) are written with compressed batches, so that a walasync that
reads versions 1 and 2 only refuses them instead of taking a compressed batch for a torn
tail; version 3 is written only when compression is on, so a log without it is written
exactly as before.

A seal frame follows the last batch of a segment once the next segment exists (format 2):
the same 24-byte header with SEAL_MAGIC, the count of index entries, and as first LSN the
LSN the next segment starts with; its payload is the segment's sparse index, the first LSN
of every batch that starts at least INDEX_INTERVAL bytes after the last indexed one
(count x u64), then those batches' offsets (count x u64), then the count again (u64). The
file is cut right after the seal, so its last 8 bytes give the seal's size. A sealed
segment is never the last one of a healthy log: if it is, the segments after it were lost.

One checksum per batch makes a batch all-or-nothing after a crash, which is what makes
`append_many` atomic, and it costs one hardware CRC32C call per batch instead of one per
record. Because the checksum covers the LSN and the length, stale bytes or a frame read at
the wrong position cannot validate; because it covers the segment's salt, neither can a
frame that a record carries as data (a replica logging its leader's batches, say), so such
a record cannot pass for a batch when recovery looks past a torn write.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from itertools import accumulate, pairwise
from typing import NamedTuple

from crc32c import crc32c

from . import _compress

__all__ = (
    "BATCH_HEADER",
    "BATCH_MAGIC",
    "FORMAT_VERSION",
    "INDEX_INTERVAL",
    "READABLE_VERSIONS",
    "SEAL_MAGIC",
    "SEGMENT_HEADER",
    "SEGMENT_MAGIC",
    "UNIT_JOINED",
    "ZSTD_MAGIC",
    "ZSTD_VERSION",
    "BatchHeader",
    "FormatError",
    "SegmentHeader",
    "check_batch",
    "decode_index",
    "decode_records",
    "decode_segment_header",
    "encode_batch",
    "encode_seal",
    "encode_segment_header",
    "expand",
    "joined_records",
    "padded",
    "parse_batch_header",
    "parse_seal_header",
    "seal_count",
    "seal_size",
    "segment_version",
)

SEGMENT_MAGIC = b"WALASYNC"
FORMAT_VERSION = 2  # written when compression is off
ZSTD_VERSION = 3  # written when it is on: segments that may hold compressed batches
READABLE_VERSIONS: tuple[int, ...] = (1, 2, 3)  # 1: no seal frames; 3: compressed batches
SEAL_MAGIC = 0x31534C57  # b"WLS1" little-endian
INDEX_INTERVAL = 16 << 10  # bytes of batches between two entries of a segment's index
UNIT_JOINED = 0x80000000  # in a record's length: the next record is of the same unit
SEGMENT_HEADER = 32
BATCH_HEADER = 24
BATCH_MAGIC = 0x31424C57  # b"WLB1" little-endian
ZSTD_MAGIC = 0x315A4C57  # b"WLZ1" little-endian: a batch whose payload is one zstd frame
MAX_PAYLOAD = 0xFFFFFFFF

_SEG = struct.Struct("<8sHHIQI")  # magic, version, flags, salt, first LSN, previous salt
_SEG_CRC = struct.Struct("<I")
_SALT = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_BATCH = struct.Struct("<IIIIQ")  # magic, crc, payload length, count, first LSN
_FIELDS = struct.Struct("<IIQ")  # payload length, count, first LSN: what the CRC covers
_U32 = array("I")
assert _U32.itemsize == 4, "walasync needs a platform with a 4-byte C unsigned int"
assert array("Q").itemsize == 8, "walasync needs a platform with an 8-byte C unsigned long long"
_SWAP = sys.byteorder == "big"
_PADS = tuple(bytes(n) for n in range(8))
_ZSTD_TAG = struct.pack("<I", ZSTD_MAGIC)  # what a compressed batch's CRC starts with


class FormatError(Exception):
    """Bytes that are not a valid header or frame (internal; mapped to CorruptionError)."""


class SegmentHeader(NamedTuple):
    """A decoded segment header."""

    first_lsn: int
    salt: int
    previous_salt: int = 0  # of the segment this file was before it was recycled
    version: int = FORMAT_VERSION


class BatchHeader(NamedTuple):
    """A decoded batch header; `size` is the whole padded frame."""

    crc: int
    length: int  # of the payload as stored
    nrecords: int
    first_lsn: int
    compressed: bool = False  # the payload is a zstd frame (ZSTD_MAGIC)

    @property
    def size(self) -> int:
        return BATCH_HEADER + padded(self.length)


def padded(n: int) -> int:
    """Round `n` up to the frame alignment (8 bytes)."""
    return (n + 7) & ~7


def encode_segment_header(
    first_lsn: int, salt: int, previous_salt: int = 0, version: int = FORMAT_VERSION
) -> bytes:
    head = _SEG.pack(SEGMENT_MAGIC, version, 0, salt, first_lsn, previous_salt)
    return head + _SEG_CRC.pack(crc32c(head))


def decode_segment_header(buf: bytes) -> SegmentHeader:
    """Decode a segment header.

    Raises:
        FormatError: the header is short, has the wrong magic or checksum.
        ValueError: the header is valid but of another format version (args: the version).
    """
    if len(buf) < SEGMENT_HEADER:
        raise FormatError("segment header is incomplete")
    magic, version, _flags, salt, first_lsn, previous = _SEG.unpack_from(buf)
    if magic != SEGMENT_MAGIC:
        raise FormatError("not a walasync segment (bad magic)")
    (crc,) = _SEG_CRC.unpack_from(buf, _SEG.size)
    if crc != crc32c(buf[: _SEG.size]):
        raise FormatError("segment header checksum mismatch")
    if version not in READABLE_VERSIONS:
        raise ValueError(version)
    return SegmentHeader(first_lsn, salt, previous, version)


def segment_version(buf: bytes) -> int:
    """The format version field of a segment header (one `decode_segment_header` took)."""
    return int(_SEG.unpack_from(buf)[1])


def encode_batch(
    first_lsn: int,
    records: Sequence[bytes],
    salt: int,
    joined: Sequence[int] = (),
    compress: Callable[[bytes], bytes | None] | None = None,
) -> tuple[bytes, bytes]:
    """Encode one batch as (header, padded payload), ready for one `pwritev`.

    `joined` lists the positions of the records that share an `append_many` unit with the
    record after them (their length entry carries UNIT_JOINED), so that a cut can tell
    where units end. With `compress` (which returns the compressed payload, or None when
    compressing does not pay), the batch may be a compressed one; only for segments of
    ZSTD_VERSION.
    """
    lengths = array("I", map(len, records))
    length = 4 * len(lengths) + sum(lengths)
    if length > MAX_PAYLOAD:
        raise ValueError("a batch payload cannot exceed 4 GiB")
    for i in joined:
        lengths[i] |= UNIT_JOINED
    if _SWAP:
        lengths.byteswap()
    if compress is not None:
        plain = b"".join((lengths.tobytes(), *records))
        frame = compress(plain)
        if frame is not None:
            return _compressed(first_lsn, len(lengths), frame, salt)
        body = plain + _PADS[-length & 7]
    else:
        body = b"".join((lengths.tobytes(), *records, _PADS[-length & 7]))
    fields = _FIELDS.pack(length, len(lengths), first_lsn)
    # Holding the GIL through the checksum (tens of microseconds for a MiB) is cheaper than
    # releasing it: this runs on the I/O thread, and taking the GIL back from a busy loop
    # costs that thread a wait each time (4 KiB records at 256 appenders: 0.37 ms of a
    # 0.9 ms batch went to encoding with the default release for buffers over 32 KiB).
    crc = crc32c(memoryview(body)[:length], crc32c(_SALT.pack(salt) + fields), gil_release_mode=0)
    return _BATCH.pack(BATCH_MAGIC, crc, length, len(lengths), first_lsn), body


def _compressed(first_lsn: int, count: int, frame: bytes, salt: int) -> tuple[bytes, bytes]:
    length = len(frame)
    fields = _FIELDS.pack(length, count, first_lsn)
    crc = crc32c(frame, crc32c(_ZSTD_TAG + _SALT.pack(salt) + fields))
    return _BATCH.pack(ZSTD_MAGIC, crc, length, count, first_lsn), frame + _PADS[-length & 7]


def parse_batch_header(buf: bytes | memoryview, offset: int = 0) -> BatchHeader | None:
    """Decode a batch header; None if its magic is wrong (zeros, garbage, or a torn write)."""
    magic, crc, length, count, first_lsn = _BATCH.unpack_from(buf, offset)
    if magic == BATCH_MAGIC:
        if count == 0 or count * 4 > length:
            return None
        return BatchHeader(crc, length, count, first_lsn)
    if magic == ZSTD_MAGIC and count and length:
        return BatchHeader(crc, length, count, first_lsn, True)
    return None


def parse_seal_header(buf: bytes | memoryview, offset: int = 0) -> BatchHeader | None:
    """Decode a seal frame's header; None if it is not one. `first_lsn` is the LSN the next
    segment starts with, `nrecords` the number of index entries."""
    magic, crc, length, count, first_lsn = _BATCH.unpack_from(buf, offset)
    if magic != SEAL_MAGIC or length != seal_size(count) - BATCH_HEADER:
        return None
    return BatchHeader(crc, length, count, first_lsn)


def seal_size(count: int) -> int:
    """Size of a whole seal frame whose index has `count` entries."""
    return BATCH_HEADER + 16 * count + 8


def seal_count(trailer: bytes) -> int:
    """The index entry count stored in a seal frame's last 8 bytes."""
    return int(_U64.unpack(trailer)[0])


def encode_seal(next_lsn: int, lsns: array[int], offsets: array[int], salt: int) -> bytes:
    """Encode a seal frame carrying the segment's index (two arrays of "Q", same length)."""
    a, b = array("Q", lsns), array("Q", offsets)
    if _SWAP:
        a.byteswap()
        b.byteswap()
    body = a.tobytes() + b.tobytes() + _U64.pack(len(a))
    fields = _FIELDS.pack(len(body), len(a), next_lsn)
    crc = crc32c(body, crc32c(_SALT.pack(salt) + fields))
    return _BATCH.pack(SEAL_MAGIC, crc, len(body), len(a), next_lsn) + body


def decode_index(head: BatchHeader, payload: bytes) -> tuple[array[int], array[int]]:
    """The (first LSNs, offsets) arrays of a checked seal frame's payload."""
    half = 8 * head.nrecords
    lsns, offsets = array("Q"), array("Q")
    lsns.frombytes(payload[:half])
    offsets.frombytes(payload[half : 2 * half])
    if _SWAP:
        lsns.byteswap()
        offsets.byteswap()
    return lsns, offsets


def check_batch(head: BatchHeader, payload: bytes | memoryview, salt: int) -> bool:
    """True if `payload` (unpadded, exactly `head.length` bytes) matches the header's CRC
    in a segment with this salt."""
    fields = _SALT.pack(salt) + _FIELDS.pack(head.length, head.nrecords, head.first_lsn)
    if head.compressed:
        fields = _ZSTD_TAG + fields
    return crc32c(payload, crc32c(fields)) == head.crc


def expand(
    head: BatchHeader, payload: bytes | memoryview, max_record_size: int
) -> tuple[BatchHeader, bytes]:
    """The header and payload of a checked batch as if it had been written plain: a
    compressed one is decompressed, a plain one comes back as it is.

    Raises:
        FormatError: a compressed payload is damaged, or claims or expands to more than
            `nrecords` records of `max_record_size` bytes (a decompression bomb).
        ImportError: zstandard, which reading a compressed batch needs, is not installed.
    """
    if not head.compressed:
        return head, bytes(payload)
    table = 4 * head.nrecords
    try:
        plain = _compress.decompress(payload, table, table + head.nrecords * max_record_size)
    except _compress.ExpandError as exc:
        raise FormatError(f"compressed batch: {exc}") from None
    return BatchHeader(head.crc, len(plain), head.nrecords, head.first_lsn), plain


def _lengths(head: BatchHeader, payload: bytes) -> array[int]:
    lengths = array("I")
    lengths.frombytes(payload[: head.nrecords * 4])
    if _SWAP:
        lengths.byteswap()
    return lengths


def decode_records(head: BatchHeader, payload: bytes) -> list[bytes]:
    """Split a checked plain payload (see `expand`) into its records.

    Raises:
        FormatError: the length table does not add up to the payload size.
    """
    if head.compressed:
        raise FormatError("a compressed batch must be expanded before it is decoded")
    table = head.nrecords * 4
    lengths = _lengths(head, payload)
    if table + sum(lengths) != head.length:  # units are marked, or the table is wrong
        lengths = array("I", [n & ~UNIT_JOINED for n in lengths])
        if table + sum(lengths) != head.length:
            raise FormatError("record lengths do not add up to the batch length")
    ends = list(accumulate(lengths, initial=table))
    return [payload[a:b] for a, b in pairwise(ends)]


def joined_records(head: BatchHeader, payload: bytes) -> list[int]:
    """Positions of the batch's records that share a unit with the record after them."""
    if head.compressed:
        raise FormatError("a compressed batch must be expanded before it is decoded")
    return [i for i, n in enumerate(_lengths(head, payload)) if n & UNIT_JOINED]
