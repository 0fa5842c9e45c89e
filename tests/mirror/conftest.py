"""Fixtures of the mirror tests: servers that are always stopped, and the lab's keys in the
environment of every chunkvol command (the lab itself, `objstore_lab`, is in tests/conftest.py)."""

import subprocess

import pytest

from tests.support.server import ENVIRONMENT


@pytest.fixture
def serves():
    """A list to append every started tests.support.mirrors.Serve to: each is killed at the end."""
    started = []
    yield started
    for serve in started:
        try:
            serve.kill()
        except (OSError, subprocess.TimeoutExpired):
            pass


@pytest.fixture
def store_env(objstore_lab, monkeypatch):
    """The lab's S3 keys in the environment of every chunkvol command and server."""
    for key, value in (("AWS_ACCESS_KEY_ID", objstore_lab["access_key"]),
                       ("AWS_SECRET_ACCESS_KEY", objstore_lab["secret_key"]),
                       ("AWS_DEFAULT_REGION", objstore_lab["s3_region"]),
                       ("CHUNKVOL_STORE_RETRY_SECONDS", "3")):
        monkeypatch.setitem(ENVIRONMENT, key, value)
    return objstore_lab
