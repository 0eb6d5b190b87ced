"""The on-disk format (`walasync._format`): pure functions, tested without any I/O."""

from __future__ import annotations

import struct

import pytest
from crc32c import crc32c
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from walasync import _format as fmt

U64 = st.integers(min_value=0, max_value=2**64 - 1)
U32 = st.integers(min_value=0, max_value=2**32 - 1)
SALT = U32
LSN = st.integers(min_value=1, max_value=2**64 - 1 - 2**20)  # room to add up to 2**20
RECORD = st.binary(max_size=64) | st.binary(min_size=200, max_size=2000)
RECORDS = st.lists(RECORD, min_size=1, max_size=40) | st.lists(
    st.binary(max_size=3), min_size=100, max_size=600
)

_SEG = struct.Struct("<8sHHIQI")  # magic, version, flags, salt, first LSN, reserved
_BATCH = struct.Struct("<IIIIQ")
# The salt of "this" segment in the batch tests; any u32 would do.
S = 0x9E3779B9


def frame(first_lsn: int, records: list[bytes], salt: int = S) -> bytes:
    head, body = fmt.encode_batch(first_lsn, records, salt)
    return head + body


def validates(buf: bytes, first_lsn: int, salt: int = S) -> bool:
    """Whether `buf` begins with a valid batch for `first_lsn` in a segment with `salt`,
    checked as a reader does: header, bounds, LSN and checksum."""
    head = fmt.parse_batch_header(buf)
    if head is None or head.first_lsn != first_lsn:
        return False
    if fmt.BATCH_HEADER + head.length > len(buf):
        return False
    return fmt.check_batch(head, buf[fmt.BATCH_HEADER : fmt.BATCH_HEADER + head.length], salt)


def segment_header(
    magic: bytes, version: int, first_lsn: int, flags: int = 0, salt: int = 0, reserved: int = 0
) -> bytes:
    """A segment header with any fields and a correct checksum."""
    head = _SEG.pack(magic, version, flags, salt, first_lsn, reserved)
    return head + struct.pack("<I", crc32c(head))


# -- segment header ---------------------------------------------------------------------


@given(U64, SALT)
@example(0, 0)
@example(1, 1)
@example(2**64 - 1, 2**32 - 1)
def test_segment_header_round_trip(first_lsn: int, salt: int) -> None:
    head = fmt.encode_segment_header(first_lsn, salt)
    assert len(head) == fmt.SEGMENT_HEADER
    assert head.startswith(fmt.SEGMENT_MAGIC)
    decoded = fmt.decode_segment_header(head)
    assert decoded == fmt.SegmentHeader(first_lsn, salt)
    assert (decoded.first_lsn, decoded.salt) == (first_lsn, salt)
    # Whatever follows the header (the first batch) is not part of it.
    assert fmt.decode_segment_header(head + b"\xff" * 100) == (first_lsn, salt, 0, 2)


@given(U64, SALT, SALT)
def test_a_recycled_segment_header_keeps_the_previous_salt(
    first_lsn: int, salt: int, previous: int
) -> None:
    head = fmt.encode_segment_header(first_lsn, salt, previous)
    assert fmt.decode_segment_header(head) == (first_lsn, salt, previous, 2)


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=20), st.data())
def test_unit_marks_round_trip_and_leave_records_unchanged(
    records: list[bytes], data: st.DataObject
) -> None:
    joined = sorted(
        data.draw(st.sets(st.integers(0, len(records) - 2))) if len(records) > 1 else set()
    )
    head_bytes, body = fmt.encode_batch(7, records, 0xABCD, joined)
    head = fmt.parse_batch_header(head_bytes)
    assert head is not None
    payload = body[: head.length]
    assert fmt.check_batch(head, payload, 0xABCD)
    assert fmt.decode_records(head, payload) == records
    assert fmt.joined_records(head, payload) == joined


@given(U64, SALT)
@example(42, 0)
@example(42, 0xDEADBEEF)
def test_segment_header_matches_its_own_encoder(first_lsn: int, salt: int) -> None:
    assert segment_header(fmt.SEGMENT_MAGIC, fmt.FORMAT_VERSION, first_lsn, salt=salt) == (
        fmt.encode_segment_header(first_lsn, salt)
    )


def test_segment_header_layout() -> None:
    head = fmt.encode_segment_header(0x0102030405060708, 0xA1B2C3D4)
    assert len(head) == fmt.SEGMENT_HEADER == 32
    magic, version, flags, salt, first_lsn, reserved = _SEG.unpack_from(head)
    assert magic == b"WALASYNC" == fmt.SEGMENT_MAGIC
    assert (version, flags, reserved) == (fmt.FORMAT_VERSION, 0, 0)
    assert head[12:16] == bytes.fromhex("d4c3b2a1")  # the salt, little-endian, at 12
    assert salt == 0xA1B2C3D4
    assert head[16:24] == bytes.fromhex("0807060504030201")  # the first LSN at 16
    assert first_lsn == 0x0102030405060708
    assert head[24:28] == bytes(4)  # reserved
    assert head[28:32] == crc32c(head[:28]).to_bytes(4, "little")  # the checksum of 0..28


@given(U64, SALT, SALT)
def test_segment_salt_is_not_the_lsn(first_lsn: int, salt: int, other: int) -> None:
    """The salt and the LSN are separate fields: changing one changes only it."""
    a = fmt.decode_segment_header(fmt.encode_segment_header(first_lsn, salt))
    b = fmt.decode_segment_header(fmt.encode_segment_header(first_lsn, other))
    assert a.first_lsn == b.first_lsn == first_lsn
    assert (a.salt == b.salt) == (salt == other)


@pytest.mark.parametrize("size", [0, 1, 8, 24, 28, fmt.SEGMENT_HEADER - 1])
def test_short_segment_header_is_a_format_error(size: int) -> None:
    head = fmt.encode_segment_header(7, 0x12345678)
    with pytest.raises(fmt.FormatError):
        fmt.decode_segment_header(head[:size])


@pytest.mark.parametrize("magic", [b"WALASYNX", b"\0" * 8, b"walasync", b"WLB1WLB1"])
def test_wrong_segment_magic_is_a_format_error(magic: bytes) -> None:
    with pytest.raises(fmt.FormatError, match="magic"):
        fmt.decode_segment_header(segment_header(magic, fmt.FORMAT_VERSION, 7, salt=3))


def test_all_zero_segment_header_is_a_format_error() -> None:
    with pytest.raises(fmt.FormatError):
        fmt.decode_segment_header(bytes(fmt.SEGMENT_HEADER))


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=8 * fmt.SEGMENT_HEADER - 1), U64, SALT)
@example(8 * 12, 12345, 0)  # the salt
@example(8 * 24, 12345, 0)  # reserved
@example(8 * 31 + 7, 12345, 0)  # the checksum's last bit
def test_any_bit_flip_in_segment_header_is_a_format_error(
    bit: int, first_lsn: int, salt: int
) -> None:
    # All 32 bytes are checked: 0..28 (salt and reserved too) by the checksum at 28..32.
    head = bytearray(fmt.encode_segment_header(first_lsn, salt))
    head[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(fmt.FormatError, match="magic" if bit < 64 else "checksum"):
        fmt.decode_segment_header(bytes(head))


@pytest.mark.parametrize("at", range(8, fmt.SEGMENT_HEADER), ids=lambda at: f"byte{at}")
def test_every_byte_of_the_segment_header_is_covered(at: int) -> None:
    """Any change to one byte after the magic (version, flags, salt, first LSN, reserved
    or the checksum itself) is a checksum mismatch, never a header that decodes."""
    good = fmt.encode_segment_header(99, 0x0BADF00D)
    for value in range(256):
        if value == good[at]:
            continue
        head = bytearray(good)
        head[at] = value
        with pytest.raises(fmt.FormatError, match="checksum"):
            fmt.decode_segment_header(bytes(head))


@pytest.mark.parametrize("at", [28, 29, 30, 31])
def test_bad_segment_header_checksum_is_a_format_error(at: int) -> None:
    head = bytearray(fmt.encode_segment_header(99, 0x0BADF00D))
    head[at] ^= 0x01  # the checksum itself
    with pytest.raises(fmt.FormatError, match="checksum"):
        fmt.decode_segment_header(bytes(head))


@pytest.mark.parametrize("field", ["flags", "salt", "reserved"])
def test_segment_header_field_changed_without_its_checksum_is_a_format_error(
    field: str,
) -> None:
    """Rewriting a field (the checksum kept, as stale or stray bytes would) is detected."""
    kwargs = {"flags": {"flags": 1}, "salt": {"salt": 8}, "reserved": {"reserved": 1}}[field]
    forged = bytearray(segment_header(fmt.SEGMENT_MAGIC, fmt.FORMAT_VERSION, 5, **kwargs))
    forged[28:32] = fmt.encode_segment_header(5, 0)[28:32]
    with pytest.raises(fmt.FormatError, match="checksum"):
        fmt.decode_segment_header(bytes(forged))


@pytest.mark.parametrize("version", [fmt.ZSTD_VERSION + 1, fmt.ZSTD_VERSION + 100, 0xFFFF, 0])
def test_other_segment_version_is_a_value_error(version: int) -> None:
    with pytest.raises(ValueError) as info:
        fmt.decode_segment_header(segment_header(fmt.SEGMENT_MAGIC, version, 5, salt=77))
    assert not isinstance(info.value, fmt.FormatError)
    assert info.value.args == (version,)


def test_segment_header_flags_do_not_matter() -> None:
    head = segment_header(fmt.SEGMENT_MAGIC, 1, 5, flags=3, salt=77)
    assert fmt.decode_segment_header(head) == fmt.SegmentHeader(5, 77, version=1)


# -- batch frames -------------------------------------------------------------------------


@settings(max_examples=50)
@given(LSN, RECORDS, SALT)
@example(1, [b""], 0)
@example(1, [b"", b"", b""], 1)
@example(1, [b"x" * 7], 2**32 - 1)
@example(2**64 - 2**20, [b"abc", b""], S)
def test_batch_round_trip(first_lsn: int, records: list[bytes], salt: int) -> None:
    head_bytes, body = fmt.encode_batch(first_lsn, records, salt)
    assert len(head_bytes) == fmt.BATCH_HEADER
    head = fmt.parse_batch_header(head_bytes + body)
    assert head is not None
    assert head.first_lsn == first_lsn
    assert head.nrecords == len(records)
    assert head.length == 4 * len(records) + sum(map(len, records))
    assert head.size == len(head_bytes) + len(body)
    payload = body[: head.length]
    assert fmt.check_batch(head, payload, salt)
    assert fmt.check_batch(head, memoryview(payload), salt)
    assert fmt.decode_records(head, payload) == records
    assert validates(head_bytes + body, first_lsn, salt)


@given(LSN, RECORDS, st.integers(min_value=0, max_value=100))
def test_batch_parses_at_an_offset(first_lsn: int, records: list[bytes], offset: int) -> None:
    buf = b"\xaa" * offset + frame(first_lsn, records)
    head = fmt.parse_batch_header(buf, offset)
    assert head is not None
    assert head.first_lsn == first_lsn
    assert fmt.check_batch(head, buf[offset + fmt.BATCH_HEADER :][: head.length], S)


@given(LSN, RECORDS)
def test_batch_is_aligned_and_padded_with_zeros(first_lsn: int, records: list[bytes]) -> None:
    head_bytes, body = fmt.encode_batch(first_lsn, records, S)
    length = 4 * len(records) + sum(map(len, records))
    assert len(head_bytes) % 8 == 0
    assert len(body) % 8 == 0
    assert len(body) == fmt.padded(length)
    assert len(body) - length < 8
    assert body[length:] == bytes(len(body) - length)


@given(st.integers(min_value=0, max_value=2**40))
def test_padded(n: int) -> None:
    p = fmt.padded(n)
    assert p % 8 == 0
    assert n <= p < n + 8


@settings(max_examples=50)
@given(LSN, RECORDS, st.data())
def test_any_bit_flip_in_a_batch_is_detected(
    first_lsn: int, records: list[bytes], data: st.DataObject
) -> None:
    head_bytes, body = fmt.encode_batch(first_lsn, records, S)
    buf = bytearray(head_bytes + body)
    covered = fmt.BATCH_HEADER + 4 * len(records) + sum(map(len, records))  # not the padding
    bit = data.draw(st.integers(min_value=0, max_value=8 * covered - 1), label="bit")
    buf[bit // 8] ^= 1 << (bit % 8)
    # Whatever the reader expects next, this frame is not it: not at its LSN ...
    assert not validates(bytes(buf), first_lsn)
    # ... nor at the LSN a flipped LSN field now claims.
    head = fmt.parse_batch_header(bytes(buf))
    if head is not None:
        assert not validates(bytes(buf), head.first_lsn)


@given(LSN, RECORDS)
def test_bit_flips_in_the_padding_are_not_covered(first_lsn: int, records: list[bytes]) -> None:
    head_bytes, body = fmt.encode_batch(first_lsn, records, S)
    length = 4 * len(records) + sum(map(len, records))
    assume(length % 8)
    buf = bytearray(head_bytes + body)
    buf[-1] = 0xFF  # padding: documented as outside the checksum; decoding ignores it
    assert validates(bytes(buf), first_lsn)
    head = fmt.parse_batch_header(bytes(buf))
    assert head is not None
    assert fmt.decode_records(head, bytes(buf[fmt.BATCH_HEADER :][:length])) == records


@given(LSN, st.integers(min_value=1, max_value=2**20), RECORDS)
@example(2**64 - 1 - 2**20, 2**20, [b""])  # the largest LSN a header holds
def test_checksum_covers_the_lsn(first_lsn: int, delta: int, records: list[bytes]) -> None:
    head_bytes, body = fmt.encode_batch(first_lsn, records, S)
    other_head, other_body = fmt.encode_batch(first_lsn + delta, records, S)
    assert other_body == body  # same payload ...
    assert other_head[4:8] != head_bytes[4:8]  # ... different checksum
    # The frame rewritten with another LSN (checksum kept) does not validate.
    moved = bytearray(head_bytes + body)
    struct.pack_into("<Q", moved, 16, first_lsn + delta)
    head = fmt.parse_batch_header(bytes(moved))
    assert head is not None
    assert head.first_lsn == first_lsn + delta
    assert not fmt.check_batch(head, body[: head.length], S)
    assert not validates(bytes(moved), first_lsn + delta)
    # Nor does the genuine frame pass as a batch at another LSN.
    genuine = fmt.parse_batch_header(head_bytes)
    assert genuine is not None
    stale = fmt.BatchHeader(genuine.crc, genuine.length, genuine.nrecords, first_lsn + delta)
    assert not fmt.check_batch(stale, body[: genuine.length], S)


@given(LSN, RECORDS)
def test_checksum_covers_length_and_count(first_lsn: int, records: list[bytes]) -> None:
    head_bytes, body = fmt.encode_batch(first_lsn, records, S)
    head = fmt.parse_batch_header(head_bytes)
    assert head is not None
    payload = body[: head.length]
    assert fmt.check_batch(head, payload, S)
    assert not fmt.check_batch(head._replace(nrecords=head.nrecords + 1), payload, S)
    assert not fmt.check_batch(head._replace(length=head.length + 1), payload, S)


@settings(max_examples=100)
@given(LSN, RECORDS, SALT, SALT)
@example(1, [b""], 0, 1)
@example(1, [b"abc"], 0, 2**31)
@example(7, [b"x" * 100, b""], 2**32 - 1, 0)
def test_checksum_covers_the_salt(
    first_lsn: int, records: list[bytes], salt: int, other: int
) -> None:
    """The same batch (LSN, records) is valid in a segment with its salt and in no other: a
    frame carried as data, or copied from another segment, does not pass for a batch."""
    assume(salt != other)
    head_bytes, body = fmt.encode_batch(first_lsn, records, salt)
    other_head, other_body = fmt.encode_batch(first_lsn, records, other)
    assert other_body == body  # same payload ...
    assert other_head[8:] == head_bytes[8:]  # ... same length, count and LSN ...
    assert other_head[4:8] != head_bytes[4:8]  # ... different checksum
    head = fmt.parse_batch_header(head_bytes)
    assert head is not None
    payload = body[: head.length]
    assert fmt.check_batch(head, payload, salt)
    assert not fmt.check_batch(head, payload, other)
    assert not fmt.check_batch(head, memoryview(payload), other)
    assert validates(head_bytes + body, first_lsn, salt)
    assert not validates(head_bytes + body, first_lsn, other)
    assert not validates(other_head + other_body, first_lsn, salt)


@given(LSN, RECORDS, SALT, st.integers(min_value=0, max_value=31))
def test_any_bit_flip_in_the_salt_is_detected(
    first_lsn: int, records: list[bytes], salt: int, bit: int
) -> None:
    head_bytes, body = fmt.encode_batch(first_lsn, records, salt)
    head = fmt.parse_batch_header(head_bytes)
    assert head is not None
    assert not fmt.check_batch(head, body[: head.length], salt ^ (1 << bit))


@given(LSN, st.integers(min_value=0, max_value=16), RECORDS, SALT, SALT)
def test_frame_carried_in_a_record_is_not_a_batch_of_the_segment(
    first_lsn: int, delta: int, records: list[bytes], salt: int, leader: int
) -> None:
    """A record that holds a frame (a replica logging the batches its leader ships): at its
    8-aligned position inside the outer batch, the inner frame parses, and it validates
    with the salt it was made with, but not as a batch of the segment that carries it."""
    assume(salt != leader)
    inner = frame(first_lsn + 1 + delta, records, leader)
    record = b"hdr:" + inner + b"trailer"  # 28 + 4 bytes in: the inner frame is aligned
    buf = frame(first_lsn, [record], salt)
    assert validates(buf, first_lsn, salt)
    at = fmt.BATCH_HEADER + 4 + 4
    assert at % 8 == 0
    assert buf[at : at + len(inner)] == inner
    assert validates(buf[at:], first_lsn + 1 + delta, leader)
    assert not validates(buf[at:], first_lsn + 1 + delta, salt)


def _forged(first_lsn: int, lengths: list[int], data: bytes) -> tuple[fmt.BatchHeader, bytes]:
    """A batch whose checksum is right but whose length table is whatever we say."""
    payload = struct.pack(f"<{len(lengths)}I", *lengths) + data
    fields = struct.pack("<IIIQ", S, len(payload), len(lengths), first_lsn)
    crc = crc32c(payload, crc32c(fields))
    raw = _BATCH.pack(fmt.BATCH_MAGIC, crc, len(payload), len(lengths), first_lsn)
    head = fmt.parse_batch_header(raw)
    assert head is not None
    assert fmt.check_batch(head, payload, S)
    return head, payload


@pytest.mark.parametrize(
    ("lengths", "data"),
    [
        ([3], b"abcde"),  # the table says less than there is
        ([9], b"abcde"),  # ... more than there is
        ([2, 2], b"abcde"),
        ([0, 0, 1], b""),
        ([0xFFFFFFFF], b"abc"),
        ([0xFFFFFFFF, 2], b"x"),  # would add up modulo 2**32
    ],
)
def test_length_table_that_does_not_add_up_is_a_format_error(
    lengths: list[int], data: bytes
) -> None:
    head, payload = _forged(10, lengths, data)
    with pytest.raises(fmt.FormatError):
        fmt.decode_records(head, payload)


def test_forged_length_table_that_adds_up_decodes() -> None:
    head, payload = _forged(10, [2, 0, 3], b"abcde")
    assert fmt.decode_records(head, payload) == [b"ab", b"", b"cde"]


def test_empty_batch_cannot_be_encoded_as_a_valid_frame() -> None:
    # A count of 0 is not a batch: parse_batch_header refuses it.
    raw = _BATCH.pack(fmt.BATCH_MAGIC, 0, 0, 0, 1)
    assert fmt.parse_batch_header(raw) is None


@pytest.mark.parametrize(
    ("magic", "length", "count"),
    [
        (0, 8, 1),  # zeros: the preallocated remainder
        (fmt.BATCH_MAGIC ^ 1, 8, 1),
        (fmt.BATCH_MAGIC, 8, 0),  # no records
        (fmt.BATCH_MAGIC, 7, 2),  # a length table longer than the payload
        (fmt.BATCH_MAGIC, 0, 1),
    ],
)
def test_parse_batch_header_rejects(magic: int, length: int, count: int) -> None:
    assert fmt.parse_batch_header(_BATCH.pack(magic, 0, length, count, 1)) is None


def test_parse_batch_header_of_zeros_is_none() -> None:
    assert fmt.parse_batch_header(bytes(fmt.BATCH_HEADER)) is None
    assert fmt.parse_batch_header(bytes(4096), 4000) is None


@settings(max_examples=200)
@given(
    st.binary(min_size=fmt.BATCH_HEADER, max_size=64)
    | st.builds(
        lambda rest: fmt.BATCH_MAGIC.to_bytes(4, "little") + rest,
        st.binary(min_size=fmt.BATCH_HEADER - 4, max_size=64),
    ),
    st.integers(min_value=0, max_value=40),
    SALT,
)
def test_parse_batch_header_on_arbitrary_bytes(buf: bytes, offset: int, salt: int) -> None:
    offset = min(offset, len(buf) - fmt.BATCH_HEADER)
    head = fmt.parse_batch_header(buf, offset)
    if head is None:
        return
    assert isinstance(head, fmt.BatchHeader)
    assert buf[offset : offset + 4] == fmt.BATCH_MAGIC.to_bytes(4, "little")
    assert head.nrecords >= 1
    assert 4 * head.nrecords <= head.length
    assert head.size == fmt.BATCH_HEADER + fmt.padded(head.length)
    # Random bytes with a magic number are still not a valid batch.
    payload = buf[offset + fmt.BATCH_HEADER :][: head.length]
    if len(payload) == head.length and fmt.check_batch(head, payload, salt):  # pragma: no cover
        pytest.fail("random bytes passed the checksum")


@given(st.binary(min_size=fmt.BATCH_HEADER, max_size=200))
def test_parse_batch_header_accepts_memoryview(buf: bytes) -> None:
    assert fmt.parse_batch_header(memoryview(buf)) == fmt.parse_batch_header(buf)


def test_batch_header_layout() -> None:
    salt = 0xA1B2C3D4
    head_bytes, body = fmt.encode_batch(0x0102030405060708, [b"ab", b""], salt)
    magic, crc, length, count, lsn = _BATCH.unpack(head_bytes)
    assert magic == fmt.BATCH_MAGIC
    assert head_bytes[:4] == b"WLB1"
    assert (length, count, lsn) == (4 * 2 + 2, 2, 0x0102030405060708)
    # The checksum: the salt (u32, little-endian), header bytes 8..24, the unpadded payload.
    assert crc == crc32c(bytes.fromhex("d4c3b2a1") + head_bytes[8:24] + body[:length])
    assert crc == crc32c(body[:length], crc32c(salt.to_bytes(4, "little") + head_bytes[8:24]))
    assert crc != crc32c(body[:length], crc32c(head_bytes[8:24]))  # not the unsalted CRC
    assert body[:8] == struct.pack("<II", 2, 0)
    assert body[8:10] == b"ab"
    assert body[10:] == bytes(6)
