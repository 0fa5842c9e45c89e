"""The network seam (chunkvol/network.py) with tests/support/faulty_network.py in its place: a
node mirror over loopback TLS in this process, a real shipper and a real receiving node, and
the link between them dropped, cut mid-frame, reset, partitioned, delayed and throttled. The
shipper must resume from its durable cursor after each break and the node must end
identical to the source; a partition must stop shipping, and healing it resume it. Also two
writing nodes through seeded partitions, and an object store failing calls from a seed.

Every fault fires at a byte of the encrypted stream (or at a numbered store call), not at a
moment: a test asserts where it fired, and nothing here sleeps to decide an outcome. The
shipping runs in the test's thread (`Shipper.ship`, as `mirror sync` does), so the order of
events is the same on every run.
"""

import random
import time

import pytest

from chunkvol import operations
from chunkvol.errors import UnreachableError
from chunkvol.mirror import config as mirror_config
from chunkvol.mirror import shipper as shipping
from chunkvol.mirror.node_link import ReceiverServer
from chunkvol.network import Network
from chunkvol.pool import Pool
from tests.support.faulty_network import HARMLESS, MODELLED, TLS_WRITE_BYTES, FaultyNetwork, FaultySocket, LinkFault
from tests.support.mirrors import assert_identical, cv, everything, new_source, write_history
from tests.support.nodes import free_port, joined
from tests.support.server import chunkvol

BATCH_BYTES = 256 << 10  # many batches: a break lands after some were acknowledged
RECV_BYTES = 1 << 16  # what the TLS layer asks of the socket at a time
SAFETY_TRIES = 8  # only so that a broken resume fails instead of looping; never the outcome


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr(shipping, "MAX_BATCH_BYTES", BATCH_BYTES)


class Link:
    """A source pool with history, a node of its pool receiving in this process through
    `server_network`, and the mirror `n2` from the one to the other."""

    def __init__(self, tmp_path, server_network):
        self.source = new_source(tmp_path)
        write_history(self.source, 5, rounds=1)
        self.node = joined(tmp_path, self.source)
        self.pool = Pool.open(self.node)
        self.lines = []
        self.server = ReceiverServer(self.pool, "127.0.0.1", 0, log=self.lines.append,
                                     network=server_network).start()
        self.address = ("127.0.0.1", self.server.port)
        cv(self.source, "mirror", "add", "n2", "--to", f"node:127.0.0.1:{self.server.port}")
        with Pool.open(self.source) as pool:
            pool.flush()
            self.horizon = pool.writer.durable_address
        self.fields = Pool.read_metadata(self.source)
        self.shippers = []
        self.total = self.behind(self.shipper(Network()))

    def shipper(self, network):
        shipper = shipping.Shipper(self.source, self.fields, "n2", mirror_config.definition_of(self.source, "n2"),
                                   network=network)
        self.shippers.append(shipper)
        return shipper

    def behind(self, shipper):
        """Log bytes from the shipper's durable cursor to the horizon."""
        return shipper.source.distance(shipper.state["cursor"], self.horizon)

    def close(self):
        for shipper in self.shippers:
            shipper.close()
        self.server.stop()
        self.pool.close()

    def assert_identical(self):
        self.close()
        assert_identical(self.source, self.node)


@pytest.fixture
def make_link(tmp_path):
    made = []

    def make(server_network=None):
        made.append(Link(tmp_path, server_network or FaultyNetwork()))
        return made[-1]
    yield make
    for link in made:
        link.close()


def ship_until_done(link, shipper):
    """Ship as `mirror run` does after a failure: again, from the cursor saved after the last
    acknowledged batch. Returns (error, log bytes still behind) of every failed try."""
    failures = []
    for _ in range(SAFETY_TRIES):
        try:
            shipper.ship(link.horizon)
            return failures
        except UnreachableError as error:
            failures.append((str(error), link.behind(shipper)))
    raise AssertionError(f"still failing after {SAFETY_TRIES} tries: {failures}")


def wait_for_line(lines, words, timeout=10):
    """The receiver's thread logs a refusal after the shipper saw the break: wait for it (the
    timeout only bounds a failure)."""
    deadline = time.monotonic() + timeout
    while not any(words in line for line in lines):
        assert time.monotonic() < deadline, f"no {words!r} in {lines}"
        time.sleep(0.02)


def assert_fired_at(fired, fault, side_bytes):
    """A cut or a reset fires at its very byte; a drop at the first call at or past it."""
    assert (fired.kind, fired.side, fired.connection) == (fault.kind, fault.side, fault.connection)
    if fault.kind == "drop":
        assert fault.after_bytes <= fired.byte < fault.after_bytes + side_bytes, (fired, fault)
    else:
        assert fired.byte == fault.after_bytes, (fired, fault)


# ---- the seam itself ----------------------------------------------------------------------------

def test_the_fault_layer_covers_every_method_of_the_network_seam():
    """A method added to chunkvol/network.py must be modelled by FaultyNetwork (or known to be
    harmless), or faults would pass it by unseen."""
    seam = {name for name in vars(Network) if not name.startswith("_") and callable(getattr(Network, name))}
    assert seam == MODELLED | HARMLESS
    overridden = {name for name in vars(FaultyNetwork) if name in seam}
    assert overridden == MODELLED - {"tune"}, "tune only sets options, on the real socket underneath"


def test_a_faulty_socket_refuses_a_call_it_does_not_model():
    connection = FaultySocket(FaultyNetwork(), real=None, side="client", number=1, endpoint=("127.0.0.1", 1))
    with pytest.raises(AttributeError, match="does not model 'makefile'"):
        connection.makefile("rb")


def test_the_same_seed_draws_the_same_faults():
    def schedule(seed):
        return FaultyNetwork.seeded(seed, connections=4, first_byte=1000, last_byte=1 << 20).link_faults
    assert schedule(7) == schedule(7)
    assert schedule(7) != schedule(8)
    assert [fault.connection for fault in schedule(7)] == [1, 2, 3, 4]


# ---- breaks: the shipper resumes from its cursor ------------------------------------------------

@pytest.mark.parametrize("kind, side, direction", [("cut", "client", "send"), ("reset", "client", "send"),
                                                   ("drop", "client", "send"), ("reset", "server", "recv"),
                                                   ("drop", "server", "recv")])
def test_the_shipper_resumes_after_the_link_breaks_mid_frame(make_link, kind, side, direction):
    """Half way through the log the link breaks (on the shipper's sending side, or on the
    receiver's receiving side); the ship fails as unreachable with the batches before the
    break acknowledged, and the next one sends only the rest."""
    fault = LinkFault(kind, side=side, direction=direction)
    server_network = FaultyNetwork([fault] if side == "server" else [])
    link = make_link(server_network)
    fault.after_bytes = link.total // 2
    client_network = FaultyNetwork([fault] if side == "client" else [])
    shipper = link.shipper(client_network)
    failures = ship_until_done(link, shipper)
    (fired,) = (client_network if side == "client" else server_network).fired
    assert_fired_at(fired, fault, TLS_WRITE_BYTES + 64 if direction == "send" else RECV_BYTES)
    (error, behind), = failures
    assert "127.0.0.1" in error
    assert 0 < behind < link.total, "the batches before the break stay acknowledged"
    if (kind, side) == ("cut", "client"):
        wait_for_line(link.lines, "in the middle of a frame")
    assert shipper.state["shipped_bytes"] <= link.total, "what was acknowledged is not sent again"
    assert link.behind(shipper) == 0 and shipper.state["last_error"] is None
    link.assert_identical()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_seeded_breaks_fire_at_their_bytes_and_the_node_ends_identical(make_link, seed):
    """One break on each of the first three connections, kind and byte drawn from the seed: each
    connection that gets as far as its byte breaks there, each break costs one failed ship,
    and the log bytes behind only ever shrink."""
    link = make_link()
    network = FaultyNetwork.seeded(seed, connections=3, first_byte=4096, last_byte=link.total // 2)
    failures = ship_until_done(link, link.shipper(network))
    assert network.fired, "the first connection carries the whole log: its break always fires"
    assert len(failures) == len(network.fired)
    for fired, fault in zip(network.fired, network.link_faults):
        assert_fired_at(fired, fault, TLS_WRITE_BYTES + 64)
    behinds = [behind for _, behind in failures]
    assert behinds == sorted(behinds, reverse=True) and behinds[-1] < link.total
    link.assert_identical()


# ---- partitions -------------------------------------------------------------------------------

def test_a_partition_stops_shipping_and_healing_resumes_it(make_link):
    """One simulated network between the shipper and the node: cut after the third batch is
    acknowledged, the ship fails on the live connection, and every new try fails at connect
    with the cursor where it was; healed, the next ship sends the rest."""
    network = FaultyNetwork()
    link = make_link(network)
    shipper = link.shipper(network)
    acknowledged = []

    def partition_after_the_third_batch(distance):
        acknowledged.append(distance)
        if len(acknowledged) == 3:
            network.partition(link.address)

    with pytest.raises(UnreachableError, match="partitioned"):
        shipper.ship(link.horizon, progress=partition_after_the_third_batch)
    behind = link.behind(shipper)
    assert 0 < behind < link.total
    for _ in range(2):
        with pytest.raises(UnreachableError, match="partitioned"):
            shipper.ship(link.horizon)
        assert link.behind(shipper) == behind, "nothing moves while partitioned"
    assert shipper.state["state"] == "error" and "partitioned" in shipper.state["last_error"]
    network.heal()
    shipper.ship(link.horizon)
    assert link.behind(shipper) == 0 and shipper.state["last_error"] is None
    assert network.opened == {"client": 2, "server": 2}, "none got through the partition"
    link.assert_identical()


# ---- slow links ---------------------------------------------------------------------------------

def test_a_delayed_and_throttled_link_slows_shipping_but_it_completes(make_link):
    """Sends paced to 16 MiB/s and every receive of the node delayed: slower, never broken. The
    bound is one-sided (the layer sleeps at least that long), so no race decides it."""
    rate = 16 << 20
    link = make_link(FaultyNetwork([LinkFault("delay", seconds=0.001, side="server", direction="recv",
                                              connection=None)]))
    shipper = link.shipper(FaultyNetwork([LinkFault("throttle", bytes_per_second=rate, connection=None)]))
    started = time.monotonic()
    assert ship_until_done(link, shipper) == []
    elapsed = time.monotonic() - started
    assert elapsed >= shipper.state["shipped_bytes"] / rate
    assert link.behind(shipper) == 0
    link.assert_identical()


def test_over_a_link_with_latency_a_new_mirror_ships_only_what_the_node_lacks(make_link):
    """Every receive of the shipper waits 50 ms first (a round trip's latency, at least once per
    acknowledged batch): the mirror catches up all the same. After new writes, a second
    mirror to the same node starts from the first chunk again but skips what the node holds:
    only the new records travel. (Was the DelayProxy part of test_mirror_slow_link.py.)"""
    link = make_link()

    def latency():
        return FaultyNetwork([LinkFault("delay", seconds=0.05, direction="recv", connection=None)])

    first = link.shipper(latency())
    assert ship_until_done(link, first) == []
    assert link.behind(first) == 0
    old_horizon = link.horizon
    with Pool.open(link.source) as pool:
        pool.volume(sorted(pool.volumes)[0]).write(random.Random(9).randbytes(2 << 20), 0)
    with Pool.open(link.source) as pool:
        pool.flush()
        link.horizon = pool.writer.durable_address
    first.close()
    cv(link.source, "mirror", "remove", "n2")  # one mirror to one address
    cv(link.source, "mirror", "add", "n2b", "--to", f"node:127.0.0.1:{link.server.port}")
    second = shipping.Shipper(link.source, link.fields, "n2b", mirror_config.definition_of(link.source, "n2b"),
                              network=latency())
    link.shippers.append(second)
    new_bytes = second.source.distance(old_horizon, link.horizon)
    assert ship_until_done(link, second) == []
    assert link.behind(second) == 0
    assert 0 < second.state["shipped_bytes"] <= new_bytes, (second.state["shipped_bytes"], new_bytes)
    link.assert_identical()


# ---- two writing nodes ----------------------------------------------------------------------

class WritingNode:
    """A node of a multi-master pair, in this process: its pool open, its receiver listening
    through the shared simulated network, and its shipper to the other node."""

    def __init__(self, path, port, network):
        self.path, self.port = path, port
        self.pool = Pool.open(path)
        self.server = ReceiverServer(self.pool, "127.0.0.1", port, log=lambda line: None, network=network).start()
        self.shipper = None
        self.flushed = []  # (offset, bytes) this node wrote and flushed, in order

    def ship(self, progress=None):
        """Ship up to a flush point made now; True if it got through."""
        horizon = operations.log_horizon(self.pool)["durable"]
        try:
            self.shipper.ship(horizon, progress=progress)
            return True
        except UnreachableError:
            return False

    def contents(self):
        volume = self.pool.volume("mm")
        buffer = bytearray(volume.size_bytes)
        volume.read(buffer, 0)
        return bytes(buffer)

    def close(self):
        if self.shipper is not None:
            self.shipper.close()
        self.server.stop()
        self.pool.close()


@pytest.mark.parametrize("seed", [1, 3])  # seeds whose rounds have both kinds of partition
def test_two_writing_nodes_through_seeded_partitions_converge_with_no_flushed_write_lost(tmp_path, seed):
    """The in-process counterpart of test_multimaster_nodes.py's partition test (which runs real
    nodes in a network namespace, with kill -9, and stays the end-to-end check): two nodes
    write their own regions and a shared one in seeded rounds while one simulated network
    between them is cut (sometimes in the middle of a ship) and healed. A ship across a
    partition fails and moves nothing; after the last heal both ship once and must hold the
    same bytes, every flushed write of each node's own region included."""
    rng = random.Random(seed)
    a_path, b_path = str(tmp_path / "A"), str(tmp_path / "B")
    cv(a_path, "init", "--chunk-size", "16M")
    cv(a_path, "join-file", str(tmp_path / "b.join"))
    cv(b_path, "init", "--join", str(tmp_path / "b.join"))
    ports = {"A": free_port(), "B": free_port()}
    addresses = [("127.0.0.1", port) for port in ports.values()]
    cv(a_path, "peer", "add", "b", "--address", f"127.0.0.1:{ports['B']}")  # not up yet: recorded
    cv(b_path, "peer", "add", "a", "--address", f"127.0.0.1:{ports['A']}")
    cv(a_path, "volume", "create", "mm", "--size", "8M", "--mode", "multi-master")
    network = FaultyNetwork()
    nodes = {"A": WritingNode(a_path, ports["A"], network), "B": WritingNode(b_path, ports["B"], network)}
    try:
        for name, other in (("A", "b"), ("B", "a")):
            node = nodes[name]
            node.shipper = shipping.Shipper(node.path, Pool.read_metadata(node.path), other,
                                            mirror_config.definition_of(node.path, other), network=network)
        assert nodes["A"].ship(), "B learns of the volume"
        regions = {"A": 0, "B": 2 << 20}
        shared = 4 << 20
        partitioned, refused, cuts = False, 0, 0
        for round_number in range(6):
            for name, node in nodes.items():
                volume = node.pool.volume("mm")
                for _ in range(4):
                    offset = regions[name] + rng.randrange(512) * 4096
                    data = rng.randbytes(4096 * rng.randint(1, 4))
                    volume.write(data, offset)
                    node.flushed.append((offset, data))
                volume.write(rng.randbytes(8192), shared + rng.randrange(256) * 4096)
                node.pool.flush()
            if rng.random() < 0.5:
                (network.heal if partitioned else network.partition)(*addresses)
                partitioned = not partitioned
            for name, node in nodes.items():
                if not partitioned and rng.random() < 0.3:  # cut once the first batch is acknowledged
                    node.ship(progress=lambda distance: network.partition(*addresses))
                    partitioned = bool(network.partitions)  # not if it failed on a connection cut before
                    cuts += partitioned
                    continue
                cursor = node.shipper.state["cursor"]
                if partitioned:
                    assert not node.ship(), (round_number, name)
                    refused += 1
                    assert node.shipper.state["cursor"] == cursor, "a ship across a partition moves nothing"
                else:  # a connection that a partition broke fails once; the next try connects anew
                    assert node.ship() or node.ship(), (round_number, name, node.shipper.state["last_error"])
        network.heal()
        assert refused and cuts, f"seed {seed}: {refused} ships refused by a partition, {cuts} cut midway"
        for node in nodes.values():
            assert node.ship() or node.ship(), "after the heal every ship gets through"
        contents = {name: node.contents() for name, node in nodes.items()}
        assert contents["A"] == contents["B"], "the nodes did not converge"
        for name, node in nodes.items():  # its own region: its flushed writes, in order, and nothing else
            model = bytearray(len(contents[name]))
            for offset, data in node.flushed:
                model[offset:offset + len(data)] = data
            region = slice(regions[name], regions[name] + (2 << 20))
            assert model[region] == contents[name][region], f"a flushed write of node {name} is missing"
    finally:
        for node in nodes.values():
            node.close()


# ---- object stores --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [4])
def test_seeded_object_store_failures_cost_retries_and_a_restore_equals_the_source(objstore_lab, tmp_path, seed):
    """RADOS behind a FaultyStore that fails one call in ten, drawn from the seed: every failed
    call costs one ship, which the next resumes from the store's chain, and a pool restored
    from the store alone equals the source. Which calls failed is what the seed says."""
    rate = 0.1
    url = f"rados:{objstore_lab['ceph_conf']}:{objstore_lab['rados_pool']}"
    source = new_source(tmp_path)
    write_history(source, seed, rounds=1)
    cv(source, "mirror", "add", "r", "--to", url)
    with Pool.open(source) as pool:
        pool.flush()
        horizon = pool.writer.durable_address
    network = FaultyNetwork(seed=seed, store_failure_rate=rate)
    shipper = shipping.Shipper(source, Pool.read_metadata(source), "r", mirror_config.definition_of(source, "r"),
                               network=network)
    failures = 0
    try:
        while True:
            try:
                shipper.ship(horizon)
                break
            except UnreachableError as error:
                assert "fault layer" in str(error), error
                failures += 1
                assert failures < 100, "the shipper never got through"
    finally:
        shipper.close()
    calls = [call for store in network.stores for call in store.calls]
    draws = random.Random(seed)
    assert [failed for _, _, failed in calls] == [draws.random() < rate for _ in calls]
    assert failures == sum(failed for _, _, failed in calls) > 0
    restored = str(tmp_path / "restored")
    chunkvol("restore", "--from", url, "--pool", restored, "--pool-uuid", Pool.read_metadata(source)["pool_uuid"])
    assert everything(restored) == everything(source)
