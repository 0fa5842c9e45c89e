"""Fast checks of the object-store layer without a store: the retry loop, how S3 answers map
to chunkvol's errors (botocore's Stubber plays the server), and the segment and manifest
formats against every kind of hostile bytes."""

import struct

import pytest
from botocore.stub import Stubber
from hypothesis import given, settings, strategies as st

from chunkvol import objstore
from chunkvol.errors import AccessDeniedError, CorruptionError, NotFoundError, UnreachableError, UsageError
from chunkvol.format import evicted, record, segment
from chunkvol.format.record import RecordType
from chunkvol.objstore import store as store_module
from chunkvol.objstore.s3_store import S3Store

POOL = bytes(range(16))


class Flaky(objstore.ObjectStore):
    """Fails `failures` times with a transient fault, then answers."""
    url = "s3:http://flaky/bucket"

    def __init__(self, failures):
        self.failures = failures
        self.calls = 0

    def _raw_get(self, name, offset, length):
        self.calls += 1
        if self.calls <= self.failures:
            raise objstore.TransientError("503 SlowDown")
        return b"data"

    # The other calls of a backend (abstract in ObjectStore); these tests do not make them.
    def _raw_put(self, name, data):
        raise AssertionError("not called here")

    _raw_size = _raw_list = _raw_delete = _raw_put


def test_transient_faults_are_retried_with_backoff_then_reported(monkeypatch):
    sleeps = []
    monkeypatch.setattr(store_module.time, "sleep", sleeps.append)
    store = Flaky(3)
    assert store.get("x") == b"data" and store.calls == 4
    # Exponential (0.1, 0.2, 0.4 s), each with jitter of +-50 %.
    assert len(sleeps) == 3 and all(0.5 * base <= slept <= 1.5 * base for slept, base in zip(sleeps, (0.1, 0.2, 0.4)))
    monkeypatch.setattr(store_module, "RETRY_SECONDS", 0.0)
    with pytest.raises(UnreachableError, match="503 SlowDown"):
        Flaky(100).get("x")


def test_a_caller_may_retry_for_less_than_the_default(monkeypatch):
    """A read that heals from a store waits for it less long than a shipper does."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    store = objstore.open_store("s3:http://127.0.0.1:9/bucket", retry_seconds=1.0)  # nothing listens on 9
    assert objstore.RETRY_SECONDS >= 2
    with pytest.raises(UnreachableError, match=r"retried for 1 s"):
        store.get("x")


def test_store_urls_are_checked():
    assert objstore.parse_url("rados:/etc/ceph/ceph.conf:pool") == ("rados", "/etc/ceph/ceph.conf", "pool")
    assert objstore.parse_url("s3:https://s3.example.com:8443/bucket") == ("s3", "https://s3.example.com:8443",
                                                                            "bucket")
    for bad in ("rados:relative.conf:pool", "s3:bucket", "s3:ftp://host/bucket", "s3:http://host/B@D", None):
        with pytest.raises(UsageError):
            objstore.parse_url(bad)


def _stubbed(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setattr(store_module.time, "sleep", lambda seconds: None)
    store = S3Store("s3:http://127.0.0.1:1/bucket", "http://127.0.0.1:1", "bucket")
    return store, Stubber(store.client)


def test_s3_answers_become_chunkvol_errors(monkeypatch):
    store, stub = _stubbed(monkeypatch)
    with stub:
        stub.add_client_error("get_object", "SlowDown", http_status_code=503)
        stub.add_client_error("get_object", "InternalError", http_status_code=500)
        stub.add_response("get_object", {"Body": _Body(b"payload")}, {"Bucket": "bucket", "Key": "k"})
        assert store.get("k") == b"payload"  # two faults retried
        stub.add_client_error("get_object", "SignatureDoesNotMatch", http_status_code=403)
        with pytest.raises(AccessDeniedError, match="access denied"):
            store.get("k")
        stub.add_client_error("get_object", "NoSuchKey", http_status_code=404)
        with pytest.raises(NotFoundError, match="no object k"):
            store.get("k")
        stub.add_client_error("put_object", "NoSuchBucket", http_status_code=404)
        with pytest.raises(NotFoundError, match="no bucket"):
            store.put("k", b"x")
        stub.assert_no_pending_responses()


class _Body:
    def __init__(self, data):
        self.data = data

    def read(self):
        return self.data


def _records(count):
    raw = []
    for sequence in range(1, count + 1):
        record_type = RecordType.COMMIT if sequence == count else RecordType.ZERO
        payload = struct.pack("<Q", 0) if record_type == RecordType.COMMIT else b""
        header = bytearray(record.HEADER_SIZE)
        record.encode_header_into(header, 0, record_type, 0, 0 if record_type == RecordType.COMMIT else 1, payload,
                                  7, sequence, 1000 + sequence, 0, 0 if record_type == RecordType.COMMIT else 4096)
        raw.append(bytes(header) + payload)
    return raw


def test_a_segment_round_trips_and_is_bound_to_its_name():
    records = _records(5)
    data, header = segment.encode(POOL, 7, records, 0, 0)
    name = segment.name(POOL, 7, 1, 5)
    decoded = segment.decode_header(data, name)
    assert (decoded.first_sequence, decoded.last_sequence, decoded.record_count) == (1, 5, 5)
    assert [bytes(raw) for raw in segment.split_records(data, decoded, name)] == records
    with pytest.raises(CorruptionError, match="not the one its name says"):
        segment.decode_header(data, segment.name(POOL, 7, 1, 6))
    with pytest.raises(CorruptionError, match="not the one its name says"):
        segment.decode_header(data, segment.name(bytes(16), 7, 1, 5))


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255), st.binary(max_size=64))
def test_damaged_segments_are_refused_never_misread(position, flip, tail):
    data, _ = segment.encode(POOL, 7, _records(3), 0, 0)
    damaged = bytearray(data + tail)
    if position < len(damaged):
        damaged[position] ^= flip or 1
    damaged = bytes(damaged)
    if damaged == data:
        return
    name = segment.name(POOL, 7, 1, 3)
    try:
        header = segment.decode_header(damaged, name)
        segment.split_records(damaged, header, name)
    except CorruptionError:
        return
    raise AssertionError("a damaged segment was accepted")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_manifests_are_refused(data):
    with pytest.raises(CorruptionError):
        evicted.decode(data, "chunk-0000000000000001.cvm")


def test_a_manifest_round_trips():
    manifest = evicted.Manifest(POOL, 7, 3, 5 << 20, 16 << 20, 99, evicted.UNIT_BYTES, evicted.PIECE_BYTES,
                                "s3:http://h/b", tuple(range(5)))
    data = evicted.encode(manifest)
    back = evicted.decode(data)
    assert (back.node_id, back.chunk_id, back.size_bytes, back.store_url, back.unit_hashes) == (
        7, 3, 5 << 20, "s3:http://h/b", tuple(range(5)))
    assert back.piece_name(2) != evicted.piece_name(POOL, 8, 3, 2), "two nodes' chunk 3 must not share objects"
    with pytest.raises(CorruptionError):
        evicted.decode(data[:-9] + data[-8:])
