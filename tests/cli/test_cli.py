"""The `chunkvol` command as a user runs it: init and volume create/list/resize/remove, bad
arguments, and the documented exit codes (chunkvol/cli/main.py):

  0 success; 1 operation failed; 2 bad usage; 3 not found; 4 already exists;
  5 pool busy; 6 data corruption found; 7 out of space;
  8 an encrypted mirror's key is missing, wrong or unreadable (tests/mirror/test_object_encryption.py).

Every error is one line on stderr, without a Python traceback. Volumes are then checked
through a real nbdkit server and libnbd.
"""

import json
import os
import shutil
import subprocess
import sys

import nbd
import pytest

from tests.support.server import CHUNKVOL, ENVIRONMENT, chunkvol

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


# ---- helpers ----------------------------------------------------------------------------

def assert_error(result, code, *words):
    """A failed command: the exit code, one line on stderr naming the problem, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chunkvol: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert result.stdout == ""


def listing(pool):
    result = chunkvol("--pool", pool, "volume", "list", "--json")
    return {row["name"]: row for row in json.loads(result.stdout)}


def metadata(pool):
    with open(os.path.join(pool, "pool.json")) as handle:
        return json.load(handle)


def new_pool(tmp_path, name="pool", chunk_size="16M"):
    path = str(tmp_path / name)
    chunkvol("--pool", path, "init", "--chunk-size", chunk_size)
    return path


# ---- init ---------------------------------------------------------------------------------

def test_init_default(tmp_path):
    path = str(tmp_path / "pool")
    result = chunkvol("--pool", path, "init")
    assert result.returncode == 0 and result.stderr == ""
    assert path in result.stdout
    fields = metadata(path)
    assert fields["chunk_size"] == 8 * GiB
    assert fields["format"] == "chunkvol-pool" and fields["version"] == 1
    assert os.path.isdir(os.path.join(path, "chunks"))
    assert listing(path) == {}
    assert chunkvol("--pool", path, "volume", "list").stdout.split() == ["NAME", "SIZE", "COMPRESSION"]


def test_init_with_chunk_size_16m(tmp_path):
    path = str(tmp_path / "pool")
    chunkvol("--pool", path, "init", "--chunk-size", "16M")
    assert metadata(path)["chunk_size"] == 16 * MiB


def test_init_through_environment_variable(tmp_path):
    path = str(tmp_path / "pool")
    environment = dict(ENVIRONMENT, CHUNKVOL_POOL=path)
    result = subprocess.run([CHUNKVOL, "init", "--chunk-size", "16M"], capture_output=True, text=True,
                            env=environment)
    assert result.returncode == 0, result.stderr
    assert metadata(path)["chunk_size"] == 16 * MiB


def test_init_refuses_bad_chunk_sizes(tmp_path):
    path = str(tmp_path / "pool")
    for size, word in (("1M", "16M"), ("0", "16M"), ("16777217", "4096"), ("1T", "512G"), ("abc", "abc"),
                       ("16X", "16X"), ("-16M", "-16M")):
        result = chunkvol("--pool", path, "init", f"--chunk-size={size}", check=False)
        assert_error(result, 2, word)
        assert not os.path.exists(os.path.join(path, "pool.json"))


def test_init_twice_refused(tmp_path):
    path = new_pool(tmp_path)
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "1M")
    before = metadata(path)
    result = chunkvol("--pool", path, "init", check=False)
    assert_error(result, 4, "already exists", path)
    assert metadata(path) == before
    assert set(listing(path)) == {"disk0"}


def test_init_on_a_regular_file_is_a_clean_error(tmp_path):
    regular = tmp_path / "regular"
    regular.write_bytes(b"data")
    for path in (regular, regular / "pool"):
        result = chunkvol("--pool", str(path), "init", "--chunk-size", "16M", check=False)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and str(regular) in result.stderr
    assert regular.read_bytes() == b"data"


# ---- volume create and list -----------------------------------------------------------------

def test_volume_create_and_list(tmp_path):
    path = new_pool(tmp_path)
    result = chunkvol("--pool", path, "volume", "create", "disk0", "--size", "64M")
    assert "disk0" in result.stdout and result.stderr == ""
    chunkvol("--pool", path, "volume", "create", "archive", "--size", "1G", "--compression", "zstd")
    chunkvol("--pool", path, "volume", "create", "tiny", "--size", "4096")
    rows = json.loads(chunkvol("--pool", path, "volume", "list", "--json").stdout)
    assert [row["name"] for row in rows] == ["archive", "disk0", "tiny"]
    by_name = {row["name"]: row for row in rows}
    assert by_name["disk0"]["size"] == 64 * MiB and by_name["disk0"]["compression"] == "none"
    assert by_name["archive"]["size"] == GiB and by_name["archive"]["compression"] == "zstd"
    assert by_name["tiny"]["size"] == 4096
    assert len({row["id"] for row in rows}) == 3
    table = chunkvol("--pool", path, "volume", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "COMPRESSION"]
    assert [line.split()[0] for line in table[1:]] == ["archive", "disk0", "tiny"]
    assert "64.0 MiB" in table[2] and "1.0 GiB" in table[1] and "zstd" in table[1]
    assert chunkvol("--pool", path, "volume", "ls").stdout.splitlines() == table
    chunkvol("--pool", path, "volume", "rm", "tiny")  # the short alias of remove
    assert set(listing(path)) == {"archive", "disk0"}


def test_volume_size_forms(tmp_path):
    path = new_pool(tmp_path)
    forms = {"4096": 4096, "64M": 64 * MiB, "64m": 64 * MiB, "64MiB": 64 * MiB, "64MB": 64 * MiB,
             "2G": 2 * GiB, "8K": 8 * KiB, "1P": 1 << 50}
    for index, text in enumerate(forms):
        chunkvol("--pool", path, "volume", "create", f"v{index}", "--size", text)
    volumes = listing(path)
    for index, size in enumerate(forms.values()):
        assert volumes[f"v{index}"]["size"] == size


def test_created_volumes_are_served(tmp_path, server_factory):
    path = new_pool(tmp_path)
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "64M")
    chunkvol("--pool", path, "volume", "create", "huge", "--size", "1P", "--compression", "zstd")
    server = server_factory(path)
    handle = server.connect("huge")
    assert handle.get_size() == 1 << 50
    handle.pwrite(b"end of a petabyte", (1 << 50) - 17)
    assert handle.pread(17, (1 << 50) - 17) == b"end of a petabyte"
    assert server.connect("disk0").get_size() == 64 * MiB


def test_cache_none_is_kept_in_the_pool_and_served(tmp_path, server_factory):
    """`init --cache none`: the log is written with O_DIRECT; pool.json and status say so;
    data written through a server reads back after a kill -9 and a clean restart. The
    plugin's cache= key overrides the pool's setting; a wrong value is refused."""
    path = str(tmp_path / "pool")
    chunkvol("--pool", path, "init", "--chunk-size", "16M", "--cache", "none")
    assert metadata(path)["cache"] == "none"
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "64M")
    assert json.loads(chunkvol("--pool", path, "status", "--json").stdout)["cache"] == "none"
    data = os.urandom(3 * MiB + 1000)
    server = server_factory(path)
    handle = server.connect("disk0")
    handle.pwrite(data, 12345)
    handle.flush()
    server.kill()
    server = server_factory(path, "cache=writeback")
    handle = server.connect("disk0")
    assert handle.pread(len(data), 12345) == data
    handle.pwrite(b"x" * 5000, 7)
    handle.flush()
    handle.shutdown()
    server.stop()
    result = subprocess.run([CHUNKVOL, "--pool", path, "serve", "--socket", str(tmp_path / "s"), "--cache", "some"],
                            capture_output=True, text=True, env=ENVIRONMENT)
    assert result.returncode == 2 and "--cache" in result.stderr
    assert_error(chunkvol("--pool", str(tmp_path / "other"), "init", "--cache", "direct", check=False), 2, "cache")


BAD_SIZES = ["12Q", "-1", "0", "4097", "1.5G", "", " ", "64 M B", "2P", "0x1000", "1e6", "-4096"]


def test_volume_create_refuses_bad_sizes(tmp_path):
    path = new_pool(tmp_path)
    for size in BAD_SIZES:
        result = chunkvol("--pool", path, "volume", "create", "v", f"--size={size}", check=False)
        assert_error(result, 2)
    assert listing(path) == {}


def test_volume_create_refuses_bad_names(tmp_path):
    path = new_pool(tmp_path)
    for name in ("bad/name", "name with space", ".hidden", "_under", "disk0@snap", "a" * 129, "caf\u00e9", "x:y"):
        result = chunkvol("--pool", path, "volume", "create", name, "--size", "1M", check=False)
        assert_error(result, 2, "name")
    assert listing(path) == {}


def test_volume_create_duplicate_name(tmp_path, server_factory):
    path = new_pool(tmp_path)
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "64M")
    server = server_factory(path)
    handle = server.connect("disk0")
    handle.pwrite(b"keep me" * 100, 0)
    handle.flush()
    handle.shutdown()
    server.stop()
    result = chunkvol("--pool", path, "volume", "create", "disk0", "--size", "8M", check=False)
    assert_error(result, 4, "disk0", "already exists")
    assert listing(path)["disk0"]["size"] == 64 * MiB
    assert server_factory(path).connect("disk0").pread(700, 0) == b"keep me" * 100


def test_volume_create_unknown_compression(tmp_path):
    path = new_pool(tmp_path)
    result = chunkvol("--pool", path, "volume", "create", "v", "--size", "1M", "--compression", "lz4", check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "lz4" in result.stderr
    assert listing(path) == {}


# ---- resize ---------------------------------------------------------------------------------------

def test_volume_resize_grow(tmp_path, server_factory):
    path = new_pool(tmp_path)
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "64M")
    server = server_factory(path)
    handle = server.connect("disk0")
    data = os.urandom(MiB)
    handle.pwrite(data, 63 * MiB)
    handle.flush()
    handle.shutdown()
    server.stop()

    result = chunkvol("--pool", path, "volume", "resize", "disk0", "--size", "128M")
    assert "disk0" in result.stdout and result.stderr == ""
    assert listing(path)["disk0"]["size"] == 128 * MiB
    server = server_factory(path)
    handle = server.connect("disk0")
    assert handle.get_size() == 128 * MiB
    assert handle.pread(MiB, 63 * MiB) == data
    assert handle.pread(MiB, 127 * MiB) == bytes(MiB)  # the new space reads as zeros
    handle.pwrite(b"grown" * 1000, 127 * MiB)
    handle.flush()
    server.kill()
    handle = server_factory(path).connect("disk0")
    assert handle.get_size() == 128 * MiB
    assert handle.pread(5000, 127 * MiB) == b"grown" * 1000
    assert handle.pread(MiB, 63 * MiB) == data


def test_volume_resize_to_the_same_size(tmp_path):
    path = new_pool(tmp_path)
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "64M")
    chunkvol("--pool", path, "volume", "resize", "disk0", "--size", "64M")
    assert listing(path)["disk0"]["size"] == 64 * MiB


def test_volume_resize_shrink_refused(tmp_path):
    path = new_pool(tmp_path)
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "64M")
    result = chunkvol("--pool", path, "volume", "resize", "disk0", "--size", "32M", check=False)
    assert_error(result, 1, "disk0", "shrink")
    assert listing(path)["disk0"]["size"] == 64 * MiB


def test_volume_resize_refuses_bad_sizes(tmp_path):
    path = new_pool(tmp_path)
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "64M")
    for size in BAD_SIZES:
        result = chunkvol("--pool", path, "volume", "resize", "disk0", f"--size={size}", check=False)
        assert_error(result, 2)
    assert listing(path)["disk0"]["size"] == 64 * MiB


# ---- remove -----------------------------------------------------------------------------------------

def test_volume_remove(tmp_path, server_factory):
    path = new_pool(tmp_path)
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "64M")
    chunkvol("--pool", path, "volume", "create", "other", "--size", "8M")
    server = server_factory(path)
    handle = server.connect("disk0")
    handle.pwrite(b"old data" * 512, 0)
    handle.flush()
    keep = server.connect("other")
    keep.pwrite(b"other data" * 100, 4096)
    keep.flush()
    handle.shutdown()
    keep.shutdown()
    server.stop()

    result = chunkvol("--pool", path, "volume", "remove", "disk0")
    assert "disk0" in result.stdout and result.stderr == ""
    assert set(listing(path)) == {"other"}
    server = server_factory(path)
    with pytest.raises(nbd.Error):
        server.connect("disk0")
    handle = server.connect("other")
    assert handle.pread(1000, 4096) == b"other data" * 100
    handle.shutdown()
    server.stop()

    # A new volume of the same name starts empty, also when the block map is rebuilt from the log.
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "64M")
    server = server_factory(path)
    handle = server.connect("disk0")
    assert handle.pread(4096, 0) == bytes(4096)
    handle.shutdown()
    server.stop()
    shutil.rmtree(os.path.join(path, "index"))
    server = server_factory(path)
    assert server.connect("disk0").pread(4096, 0) == bytes(4096)
    assert server.connect("other").pread(1000, 4096) == b"other data" * 100


# ---- not found ----------------------------------------------------------------------------------------

def test_missing_volume(tmp_path):
    path = new_pool(tmp_path)
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "1M")
    for verb in (["resize", "nosuch", "--size", "2M"], ["remove", "nosuch"]):
        result = chunkvol("--pool", path, "volume", *verb, check=False)
        assert_error(result, 3, "nosuch")
    assert set(listing(path)) == {"disk0"}


def test_missing_pool(tmp_path):
    path = str(tmp_path / "nowhere" / "pool")
    for verb in (["list"], ["list", "--json"], ["create", "v", "--size", "1M"], ["resize", "v", "--size", "2M"],
                 ["remove", "v"]):
        result = chunkvol("--pool", path, "volume", *verb, check=False)
        assert_error(result, 3, path)
    assert not os.path.exists(tmp_path / "nowhere")  # nothing created on the way


def test_no_pool_given(tmp_path):
    environment = {key: value for key, value in ENVIRONMENT.items() if key != "CHUNKVOL_POOL"}
    result = subprocess.run([CHUNKVOL, "volume", "list"], capture_output=True, text=True, env=environment)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--pool" in result.stderr


# ---- a pool held by a running server -------------------------------------------------------------------

def test_changes_reach_a_running_server(tmp_path, server_factory):
    """Beside a running server, changing commands go through its control socket."""
    path = new_pool(tmp_path)
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "64M")
    server = server_factory(path)
    handle = server.connect("disk0")
    handle.pwrite(b"busy" * 1024, 0)
    handle.flush()

    assert "created volume v2" in chunkvol("--pool", path, "volume", "create", "v2", "--size", "1M").stdout
    other = server.connect("v2")
    assert other.get_size() == 1 * MiB
    other.shutdown()
    chunkvol("--pool", path, "volume", "resize", "disk0", "--size", "128M")
    # A volume with a client connected is not removed under it.
    result = chunkvol("--pool", path, "volume", "remove", "disk0", check=False)
    assert_error(result, 5, "in use", "connection")
    chunkvol("--pool", path, "volume", "remove", "v2")
    assert sorted(listing(path)) == ["disk0"]
    assert listing(path)["disk0"]["size"] == 128 * MiB
    # The server was not disturbed: the open connection keeps its size and data.
    assert handle.pread(4096, 0) == b"busy" * 1024
    handle.pwrite(b"still" * 100, 8192)
    handle.flush()
    assert handle.get_size() == 64 * MiB
    handle.shutdown()
    assert server.connect("disk0").get_size() == 128 * MiB
    server.stop()


def test_pool_held_without_a_control_socket(tmp_path):
    """A process that holds the pool but serves no control socket: changes are refused with
    the reason, and nothing changes."""
    path = new_pool(tmp_path)
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "64M")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from chunkvol.pool import Pool; "
                               "pool = Pool.open(sys.argv[1]); print('open', flush=True); time.sleep(600)", path],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        before = metadata(path)
        for verb in (["create", "v2", "--size", "1M"], ["resize", "disk0", "--size", "128M"], ["remove", "disk0"]):
            result = chunkvol("--pool", path, "volume", *verb, check=False)
            assert_error(result, 5, "control socket")
        result = chunkvol("--pool", path, "snapshot", "create", "disk0@s", check=False)
        assert_error(result, 5, "control socket")
        assert metadata(path) == before
        assert listing(path)["disk0"]["size"] == 64 * MiB and sorted(listing(path)) == ["disk0"]
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone the pool is free again.
    chunkvol("--pool", path, "volume", "create", "v2", "--size", "1M")
    assert set(listing(path)) == {"disk0", "v2"}


# ---- error format -------------------------------------------------------------------------------------

def test_usage_errors_are_one_line_exit_2(tmp_path):
    path = new_pool(tmp_path)
    environment = {key: value for key, value in ENVIRONMENT.items() if key != "CHUNKVOL_POOL"}
    no_pool = subprocess.run([CHUNKVOL, "volume", "list"], capture_output=True, text=True, env=environment)
    results = [no_pool]
    for arguments in (["--pool", path], ["--pool", path, "volume"], ["--pool", path, "volume", "create", "v"],
                      ["--pool", path, "volume", "frobnicate"], ["--pool", path, "nosuchcommand"],
                      ["--pool", path, "volume", "create", "--size", "1M"],
                      ["--pool", path, "volume", "create", "v", "--size", "1M", "--compression", "lz4"],
                      ["--pool", path, "init", "--chunk-size"], ["--pool", path, "volume", "list", "--bogus"]):
        results.append(chunkvol(*arguments, check=False))
    for result in results:
        assert result.returncode == 2, (result.args, result.stderr)
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("chunkvol"), (result.args, result.stderr)
    assert listing(path) == {}
