"""The object-store lab (tools/objstore_lab.py) really serves RADOS and S3, and `down` stops it."""

import os
import subprocess
import time

import pytest
import rados
from botocore.exceptions import ClientError

from tests.support.objstore_lab import s3_client
from tests.support.paths import ROOT
from tools.objstore_lab import Lab, above_ephemeral, free_port

TOOL = os.path.join(ROOT, "tools", "objstore_lab.py")


def running(pid):
    """Like `kill -0`, but a zombie (killed, not yet reaped by init) counts as stopped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def lab_tool(*arguments):
    return subprocess.run(["/usr/bin/python3", TOOL, *arguments], capture_output=True, text=True, timeout=120)


def test_rados_round_trip(objstore_lab):
    cluster = rados.Rados(conffile=objstore_lab["ceph_conf"])  # the conf file alone names the keyring
    cluster.connect(timeout=10)
    try:
        with cluster.open_ioctx(objstore_lab["rados_pool"]) as ioctx:
            data = os.urandom(4 * 1024 * 1024 + 1)
            ioctx.write_full("test.chunk.1", data)
            assert ioctx.read("test.chunk.1", length=len(data)) == data
            assert ioctx.read("test.chunk.1", length=4096, offset=1 << 20) == data[1 << 20:(1 << 20) + 4096]
            size, _ = ioctx.stat("test.chunk.1")
            assert size == len(data)
            assert "test.chunk.1" in {entry.key for entry in ioctx.list_objects()}
            ioctx.remove_object("test.chunk.1")
            with pytest.raises(rados.ObjectNotFound):
                ioctx.stat("test.chunk.1")
    finally:
        cluster.shutdown()


def test_s3_round_trip(objstore_lab):
    s3, bucket = s3_client(objstore_lab), objstore_lab["s3_bucket"]
    data = os.urandom(8 * 1024 * 1024)
    s3.put_object(Bucket=bucket, Key="test/chunk.1", Body=data)
    assert s3.get_object(Bucket=bucket, Key="test/chunk.1")["Body"].read() == data
    part = s3.get_object(Bucket=bucket, Key="test/chunk.1", Range="bytes=4096-8191")
    assert part["ContentLength"] == 4096 and part["Body"].read() == data[4096:8192]
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="test/")["Contents"]
    assert [(entry["Key"], entry["Size"]) for entry in listed] == [("test/chunk.1", len(data))]
    s3.delete_object(Bucket=bucket, Key="test/chunk.1")
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="test/")


def test_s3_wrong_secret_is_refused(objstore_lab):
    s3 = s3_client(objstore_lab, secret_key="not-the-secret-key-of-the-lab")
    with pytest.raises(ClientError) as refused:
        s3.put_object(Bucket=objstore_lab["s3_bucket"], Key="test/forged", Body=b"x")
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_command_line_up_refuse_env_down(tmp_path):
    """A RADOS-only lab through the command line (about 1 s): a second `up` on the same directory
    is refused, `env` points at it, `down` leaves none of its daemons running, and a client of
    the stopped lab gets an error within its timeout instead of hanging."""
    directory, lab = str(tmp_path / "lab"), Lab(tmp_path / "lab")
    port = free_port(above_ephemeral(400))
    try:
        started = lab_tool("up", "--dir", directory, "--no-rgw", "--mon-port", str(port))
        assert started.returncode == 0, started.stderr
        pids = lab.info["pids"]
        assert sorted(pids) == ["mon.a", "osd.0"] and all(running(pid) for pid in pids.values())
        again = lab_tool("up", "--dir", directory, "--no-rgw", "--mon-port", str(port))
        assert again.returncode == 1 and "already runs a lab" in again.stderr
        assert f"export CEPH_CONF={lab.conf}" in lab_tool("env", "--dir", directory).stdout.splitlines()
        stopped = lab_tool("down", "--dir", directory)
        assert stopped.returncode == 0, stopped.stderr
        assert not [pid for pid in pids.values() if running(pid)]
    finally:
        lab.down()
    cluster = rados.Rados(conffile=lab.conf)
    began = time.monotonic()
    with pytest.raises(rados.Error):
        cluster.connect()
    assert time.monotonic() - began < 30
    cluster.shutdown()
