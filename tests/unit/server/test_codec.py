"""The on-disk byte formats: records round-trip, the chain trailer is consistent,
and every LMDB key sorts the way the storage layer's range scans assume."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lethedb_server.storage import codec
from lethedb_server.storage.codec import RecordBody

U64 = st.integers(min_value=0, max_value=2**64 - 1)
U32 = st.integers(min_value=0, max_value=2**32 - 1)
HASHES = st.binary(min_size=codec.HASH_SIZE, max_size=codec.HASH_SIZE)
# Identifiers as the validator admits them are a subset of this; the codec must
# cope with any text, including the empty string and non-ASCII characters.
NAMES = st.text(max_size=40)

RECORD_BODIES = st.builds(
    RecordBody,
    format=st.just(codec.RECORD_FORMAT),
    stream_id=NAMES,
    stream_version=U64,
    event_id=st.binary(min_size=16, max_size=16),
    event_type=NAMES,
    subject_id=NAMES,
    content_type=NAMES,
    recorded_at=U64,
    dek_version=U32,
    nonce=st.binary(min_size=12, max_size=12),
    ciphertext=st.binary(max_size=512),
)

# derandomize: the same examples on every run, so the suite is deterministic.
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)


# -- records -------------------------------------------------------------------


@PROPERTY
@given(body=RECORD_BODIES)
def test_record_body_round_trips_through_msgpack(body: RecordBody):
    assert msgspec.msgpack.decode(codec.encode(body), type=RecordBody) == body


@PROPERTY
@given(previous=HASHES, body=RECORD_BODIES)
def test_sealed_record_decodes_to_the_same_body(previous: bytes, body: RecordBody):
    value, _ = codec.seal_record(previous, body)

    assert codec.decode_record(value) == body


@PROPERTY
@given(previous=HASHES, body=RECORD_BODIES)
def test_sealed_record_is_the_encoded_body_followed_by_its_chain_hash(
    previous: bytes, body: RecordBody
):
    value, digest = codec.seal_record(previous, body)
    encoded, trailer = codec.split_record(value)

    assert bytes(encoded) == codec.encode(body)
    assert trailer == digest
    assert len(digest) == codec.HASH_SIZE
    assert digest == codec.chain_hash(previous, bytes(encoded))


@PROPERTY
@given(previous=HASHES, other=HASHES, body=RECORD_BODIES)
def test_chain_hash_depends_on_the_previous_hash(previous: bytes, other: bytes, body: RecordBody):
    _, digest = codec.seal_record(previous, body)
    _, digest_after_other = codec.seal_record(other, body)

    assert (digest == digest_after_other) == (previous == other)


@PROPERTY
@given(previous=HASHES, body=RECORD_BODIES, data=st.data())
def test_any_changed_byte_of_a_sealed_body_breaks_its_chain_hash(
    previous: bytes, body: RecordBody, data: st.DataObject
):
    value, digest = codec.seal_record(previous, body)
    encoded, _ = codec.split_record(value)
    index = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1), label="index")
    flip = data.draw(st.integers(min_value=1, max_value=255), label="xor")
    damaged = bytearray(encoded)
    damaged[index] ^= flip

    assert codec.chain_hash(previous, bytes(damaged)) != digest


def test_the_first_record_chains_after_the_all_zero_genesis_hash():
    assert bytes(codec.HASH_SIZE) == codec.GENESIS_HASH


@PROPERTY
@given(
    data=st.binary(max_size=256),
    metadata=st.binary(max_size=256),
)
def test_payload_round_trips_through_msgpack(data: bytes, metadata: bytes):
    payload = codec.Payload(data, metadata)

    assert codec.decode_payload(codec.encode(payload)) == payload


@PROPERTY
@given(
    info=st.builds(codec.StreamInfo, U64, U64, U64),
    tombstone=st.builds(codec.Tombstone, U64, U64, NAMES, U64),
    meta=st.builds(
        codec.LogMeta, st.just(1), st.binary(min_size=16, max_size=16), U64, HASHES, U64, U64
    ),
)
def test_stored_structs_round_trip_through_msgpack(
    info: codec.StreamInfo, tombstone: codec.Tombstone, meta: codec.LogMeta
):
    assert codec.decode_stream(codec.encode(info)) == info
    assert codec.decode_tombstone(codec.encode(tombstone)) == tombstone
    assert codec.decode_meta(codec.encode(meta)) == meta


def test_a_log_meta_written_before_subject_indexed_existed_reads_as_fully_indexed():
    # Such a log indexed every event in its append transaction.
    old = codec.encode((1, bytes(16), 41, codec.GENESIS_HASH, 2))

    meta = codec.decode_meta(old)

    assert meta.subject_indexed == meta.last_position == 41
    assert meta.shred_epoch == 2


def test_record_subject_reads_the_subject_id_without_the_ciphertext():
    body = RecordBody(
        1, "orders-1", 3, bytes(16), "Placed", "subject-7", "t", 5, 1, bytes(12), b"x"
    )
    value, _ = codec.seal_record(codec.GENESIS_HASH, body)

    assert codec.record_subject(value) == "subject-7"


# -- keys ------------------------------------------------------------------------


@PROPERTY
@given(a=U64, b=U64)
def test_position_keys_sort_numerically(a: int, b: int):
    assert (codec.position_key(a) < codec.position_key(b)) == (a < b)
    assert codec.position_from_key(codec.position_key(a)) == a


@PROPERTY
@given(stream=NAMES, a=U64, b=U64)
def test_versions_of_one_stream_sort_numerically(stream: str, a: int, b: int):
    key_a = codec.stream_version_key(stream, a)
    key_b = codec.stream_version_key(stream, b)

    assert (key_a < key_b) == (a < b)
    assert codec.from_u64(key_a[-8:]) == a


def _ranges_are_disjoint(
    key_of: Callable[[str, int], bytes], first: str, second: str, top: int
) -> bool:
    """All keys of *first* sort before all keys of *second*, or all after."""
    lowest_first, highest_first = key_of(first, 0), key_of(first, top)
    lowest_second, highest_second = key_of(second, 0), key_of(second, top)
    return highest_first < lowest_second or highest_second < lowest_first


@PROPERTY
@given(stream=NAMES, suffix=st.text(min_size=1, max_size=10))
@example(stream="order-1", suffix="0")
@example(stream="a", suffix="\x00")
@example(stream="", suffix="x")
def test_a_stream_id_that_prefixes_another_never_interleaves_with_it(stream: str, suffix: str):
    longer = stream + suffix

    assert _ranges_are_disjoint(codec.stream_version_key, stream, longer, 2**64 - 1)


@PROPERTY
@given(first=NAMES, second=NAMES)
def test_key_ranges_of_different_streams_are_disjoint(first: str, second: str):
    if first != second:
        assert _ranges_are_disjoint(codec.stream_version_key, first, second, 2**64 - 1)


@PROPERTY
@given(entries=st.lists(st.tuples(st.sampled_from(["a", "ab", "b", "a\x00", "ba"]), U64)))
def test_sorted_stream_index_keys_group_by_stream_then_version(entries: list[tuple[str, int]]):
    keys = sorted({codec.stream_version_key(s, v): (s, v) for s, v in entries}.items())
    order = [pair for _, pair in keys]

    streams_in_order = [s for s, _ in order]
    # Each stream occupies one contiguous run...
    runs = [s for i, s in enumerate(streams_in_order) if i == 0 or streams_in_order[i - 1] != s]
    assert len(runs) == len(set(runs))
    # ...in which versions ascend.
    for stream in set(streams_in_order):
        versions = [v for s, v in order if s == stream]
        assert versions == sorted(versions)


@PROPERTY
@given(stream=NAMES, other=NAMES, version=U64)
def test_stream_prefix_matches_exactly_the_keys_of_its_stream(
    stream: str, other: str, version: int
):
    prefix = codec.stream_prefix(stream)

    assert codec.stream_version_key(stream, version).startswith(prefix)
    assert codec.stream_version_key(other, version).startswith(prefix) == (other == stream)


@PROPERTY
@given(subject=NAMES, other=NAMES, a=U64, b=U64)
def test_subject_index_keys_group_by_subject_and_sort_by_position(
    subject: str, other: str, a: int, b: int
):
    key_a = codec.subject_position_key(subject, a)
    key_b = codec.subject_position_key(subject, b)

    assert (key_a < key_b) == (a < b)
    assert key_a.startswith(codec.subject_prefix(subject))
    assert codec.subject_position_key(other, a).startswith(codec.subject_prefix(subject)) == (
        other == subject
    )
    if other != subject:
        assert _ranges_are_disjoint(codec.subject_position_key, subject, other, 2**64 - 1)


@PROPERTY
@given(subject=NAMES, other=NAMES, a=U32, b=U32)
def test_dek_keys_group_by_subject_and_sort_by_version(subject: str, other: str, a: int, b: int):
    key_a = codec.dek_key(subject, a)
    key_b = codec.dek_key(subject, b)

    assert (key_a < key_b) == (a < b)
    assert codec.dek_version_from_key(key_a) == a
    if other != subject:
        assert _ranges_are_disjoint(codec.dek_key, subject, other, 2**32 - 1)
