"""Every mirror target keeps the rules of chunkvol/mirror/target.py: the same checks, run on
each one (as ZODB's storage mixins and Litestream's replica client tests do).

TARGETS lists an opener per target: `opener(site)` connects to the target of this test, and
calling it again reaches the same target (a reconnect). Adding a target is one class (with
the methods of mirror/target.py) plus one line in TARGETS; `Site` gives what an opener may
need (the source pool and its fields, a path, a listening node, the object-store lab), each
made only when asked, so the lab is started (once per session, shared with the other
object-store tests) only when a rados: or s3: case runs.
"""

import os

import pytest

from chunkvol.errors import PeerError, UnreachableError
from chunkvol.format.record import RecordType
from chunkvol.format.store_key import StoreKey
from chunkvol.mirror import shipper as shipping
from chunkvol.mirror.memory_target import MemoryStore, MemoryTarget
from chunkvol.mirror.node_link import NodeTarget, ReceiverServer
from chunkvol.mirror.object_target import ObjectTarget
from chunkvol.mirror.target import PipelinedTarget, Target
from chunkvol.mirror.targets import DirTarget
from chunkvol.pool import Pool
from tests.support.records import batches_of, fetch_key, flipped, forged, header_of
from tests.support.server import chunkvol
from tests.support.targets import AcknowledgementLost

pytestmark = pytest.mark.objstore_lab  # its rados: and s3: targets use the lab

WRITE_BYTES = 64 << 10
FLUSH_POINTS = 6  # one batch each when the shipper's batches are small


class Site:
    """What a target of one test is opened with, each part made at its first use."""

    def __init__(self, tmp_path, request, monkeypatch):
        self.tmp_path, self.request, self.monkeypatch = tmp_path, request, monkeypatch
        self.source = written_source(str(tmp_path / "source"))
        self.fields = Pool.read_metadata(self.source)
        self.made = {}
        self.closing = []

    def path(self, name):
        return str(self.tmp_path / name)

    def once(self, name, make):
        if name not in self.made:
            self.made[name] = make()
        return self.made[name]

    def memory(self):
        return self.once("memory", lambda: MemoryStore(bytes.fromhex(self.fields["pool_uuid"])))

    def receiver_port(self):
        """A node of the pool (`init --join`) receiving in this process."""
        def start():
            join, node = self.path("node.join"), self.path("node")
            chunkvol("--pool", self.source, "join-file", join)
            chunkvol("--pool", node, "init", "--join", join)
            pool = Pool.open(node)
            server = ReceiverServer(pool, "127.0.0.1", 0, log=lambda line: None).start()
            self.closing += [server.stop, pool.close]
            return server.port
        return self.once("node", start)

    def lab(self):
        lab = self.request.getfixturevalue("objstore_lab")
        for key, name in (("AWS_ACCESS_KEY_ID", "access_key"), ("AWS_SECRET_ACCESS_KEY", "secret_key"),
                          ("AWS_DEFAULT_REGION", "s3_region")):
            self.monkeypatch.setenv(key, lab[name])
        return lab

    def rados_url(self):
        lab = self.lab()
        return f"rados:{lab['ceph_conf']}:{lab['rados_pool']}"

    def s3_url(self):
        lab = self.lab()
        return f"s3:{lab['s3_endpoint']}/{lab['s3_bucket']}"

    def key(self):
        """The key of this test's encrypted object-store target (the same at each reconnect)."""
        return self.once("key", lambda: StoreKey(os.urandom(32)))

    def close(self):
        for close in self.closing:
            close()


TARGETS = [
    pytest.param(lambda site: MemoryTarget(site.fields, site.memory()), id="memory"),
    pytest.param(lambda site: DirTarget(site.path("mirror"), site.fields, site.source), id="dir"),
    pytest.param(lambda site: NodeTarget("127.0.0.1", site.receiver_port(), site.fields, site.source), id="node"),
    pytest.param(lambda site: ObjectTarget(site.rados_url(), site.fields), id="rados"),
    pytest.param(lambda site: ObjectTarget(site.s3_url(), site.fields), id="s3"),
    pytest.param(lambda site: ObjectTarget(site.rados_url(), site.fields, key=site.key()), id="rados-encrypted"),
    pytest.param(lambda site: ObjectTarget(site.s3_url(), site.fields, key=site.key()), id="s3-encrypted"),
]

def written_source(path):
    """A pool with one volume and FLUSH_POINTS flush intervals of writes, each a batch."""
    Pool.create(path, chunk_size=16 << 20)
    with Pool.open(path) as pool:
        pool.create_volume("v", 16 << 20)
        volume = pool.volume("v")
        for index in range(FLUSH_POINTS):
            volume.write(os.urandom(WRITE_BYTES), index * WRITE_BYTES * 3)
            pool.flush()
    return path


@pytest.fixture(params=TARGETS)
def connect(request, tmp_path, monkeypatch):
    """connect() -> a new connection to this test's target, the one before closed first (a
    dir: target holds its pool's lock, as one shipper does)."""
    site = Site(tmp_path, request, monkeypatch)
    opened = []

    def opener():
        for target in opened:
            target.close()  # closing twice is harmless: a rule of every target
        target = request.param(site)
        opened.append(target)
        return target
    opener.site = site
    yield opener
    for target in opened:
        target.close()
    site.close()


def whole_batch(site):
    """(origin, every record of the source as one batch)."""
    fields, batches = batches_of(site.source)
    return fields["node_id"], [raw for batch in batches for raw in batch]


def sequence_of(raw):
    return header_of(raw)[5]


def extents(records):
    return [raw for raw in records if header_of(raw)[0] == RecordType.EXTENT]


def assert_holds(target, origin, records):
    """`target` holds `records` of `origin`: as far as have() says, and each EXTENT's bytes."""
    assert target.have(origin) == sequence_of(records[-1])
    for raw in extents(records):
        assert target.fetch(*fetch_key(raw)) == raw


def test_every_target_is_a_target(connect):
    target = connect()
    assert isinstance(target, Target)
    assert isinstance(target, PipelinedTarget) == isinstance(target, ObjectTarget)
    assert isinstance(target.describe(), dict)


def test_an_empty_target_has_nothing(connect):
    origin, records = whole_batch(connect.site)
    target = connect()
    assert target.have(origin) == 0
    assert target.fetch(*fetch_key(extents(records)[0])) is None


def test_a_batch_sent_again_is_applied_once(connect):
    origin, records = whole_batch(connect.site)
    target = connect()
    assert target.send(origin, records) == sequence_of(records[-1])
    assert target.send(origin, records) == sequence_of(records[-1])
    assert target.send(origin, records[-3:]) == sequence_of(records[-1])  # an older tail: nothing
    assert_holds(connect(), origin, records)


def test_a_batch_not_ending_at_a_commit_is_refused(connect):
    origin, records = whole_batch(connect.site)
    assert header_of(records[-2])[0] != RecordType.COMMIT
    with pytest.raises(PeerError):
        connect().send(origin, records[:-1])
    assert connect().have(origin) == 0


@pytest.mark.parametrize("hostility", ["flipped bit", "forged origin", "another stamp's node index"])
def test_a_hostile_batch_changes_nothing(connect, hostility):
    origin, records = whole_batch(connect.site)
    index = records.index(extents(records)[0])
    bad = {"flipped bit": lambda raw: flipped(raw),
           "forged origin": lambda raw: forged(raw, origin_node=origin + 1),
           "another stamp's node index": lambda raw: forged(raw, hlc=header_of(raw)[6] ^ 1)}[hostility]
    with pytest.raises(PeerError):
        connect().send(origin, records[:index] + [bad(records[index])] + records[index + 1:])
    target = connect()
    assert target.have(origin) == 0
    assert target.fetch(*fetch_key(records[index])) is None
    target.send(origin, records)  # and the honest batch is taken whole after it
    assert_holds(target, origin, records)


def test_fetch_answers_the_bytes_sent_or_nothing(connect):
    origin, records = whole_batch(connect.site)
    target = connect()
    target.send(origin, records)
    assert_holds(target, origin, records)
    volume_ids, group, ref, offset = fetch_key(extents(records)[0])
    assert target.fetch(volume_ids, group, (0, ref[1], ref[2] + 16, ref[3]), offset) is None  # no such stamp
    assert target.fetch(volume_ids, group, ref, offset + 4096) is None  # not at that offset


def test_close_twice_is_harmless(connect):
    target = connect()
    target.close()
    target.close()


@pytest.mark.parametrize("nth", [1, 3])
def test_a_lost_acknowledgement_is_shipped_again_and_the_target_ends_identical(connect, nth, monkeypatch):
    """The shipper's view of a crash between the target applying a batch and its answer: the
    cursor stays before that batch, and the next ship (a new shipper, a new connection, as
    after a restart) sends it again; the target takes it once and ends holding everything."""
    monkeypatch.setattr(shipping, "MAX_BATCH_BYTES", WRITE_BYTES)  # one flush interval a batch
    site = connect.site
    origin, records = whole_batch(site)
    with Pool.open(site.source) as pool:
        horizon = pool.writer.durable_address
    definition = {"to": "a conformance target"}
    shipper = shipping.Shipper(site.source, site.fields, "m", definition)
    lossy = shipper.target = AcknowledgementLost(connect(), nth)
    with pytest.raises(UnreachableError):
        shipper.ship(horizon)
    shipper.close()
    assert lossy.applies == nth and shipper.state["state"] == "error"

    again = shipping.Shipper(site.source, site.fields, "m", definition)
    again.target = connect()
    try:
        again.ship(horizon)
    finally:
        again.close()
    assert again.state["shipped_sequence"] == sequence_of(records[-1])
    assert_holds(connect(), origin, records)
