"""The object-store lab as a pytest fixture: one Ceph cluster with radosgw for the whole session.

    from tests.support.objstore_lab import s3_client

    def test_something(objstore_lab):
        rados.Rados(conffile=objstore_lab["ceph_conf"]) ...    # pool objstore_lab["rados_pool"]
        s3_client(objstore_lab).put_object(Bucket=objstore_lab["s3_bucket"], ...)

Every test finds the fixture (tests/conftest.py imports it, so one lab serves the whole session);
`store_env`, which puts the lab's keys in the environment of every chunkvol command, is in
tests/mirror/conftest.py. `rados_url(lab)` and `s3_url(lab)` are the lab's store as a mirror's
`--to` or restore's `--from`.

The lab (tools/objstore_lab.py) listens on free ports from 41301 (monitor and OSD) and 41081
(S3), so a user's lab on the default ports keeps running. It is always stopped at the end of the
session, also when tests fail; its files stay in pytest's temporary directory.
"""

import boto3
import pytest
from botocore.config import Config

from tools.objstore_lab import Lab, above_ephemeral, free_port


@pytest.fixture(scope="session")
def objstore_lab(tmp_path_factory):
    """The lab.json dict of a running lab: ceph_conf, rados_pool, s3_endpoint, s3_bucket, keys, pids."""
    lab = Lab(tmp_path_factory.mktemp("objstore"), mon_port=free_port(above_ephemeral(300)),
              rgw_port=free_port(above_ephemeral(80)))
    try:
        yield lab.up(rgw=True)
    finally:
        lab.down()


def s3_client(info, secret_key=None):
    """A boto3 S3 client for the lab (path-style addressing: the lab has no DNS for buckets)."""
    return boto3.client("s3", endpoint_url=info["s3_endpoint"], region_name=info["s3_region"],
                        aws_access_key_id=info["access_key"],
                        aws_secret_access_key=secret_key or info["secret_key"],
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                      connect_timeout=5, read_timeout=30))


def rados_url(lab):
    return f"rados:{lab['ceph_conf']}:{lab['rados_pool']}"


def s3_url(lab):
    return f"{'s3:' + lab['s3_endpoint']}/{lab['s3_bucket']}"


class Tampering:
    """The lab's bucket as someone who runs it may change it: `originals` of the named objects
    are kept, so that after each change `mended()` puts them all back."""

    def __init__(self, lab, names):
        self.client = s3_client(lab)
        self.bucket = lab["s3_bucket"]
        self.originals = {name: self.get(name) for name in names}

    def get(self, name):
        return self.client.get_object(Bucket=self.bucket, Key=name)["Body"].read()

    def put(self, name, data):
        self.client.put_object(Bucket=self.bucket, Key=name, Body=data)

    def delete(self, name):
        self.client.delete_object(Bucket=self.bucket, Key=name)

    def mended(self):
        for name, data in self.originals.items():
            self.put(name, data)
