"""A throw-away Ceph cluster (RADOS + optional S3 through radosgw) on 127.0.0.1, in one directory.

chunkvol can mirror a pool to Ceph RADOS and to S3; this lab gives both on one machine so tests
and users can try those targets without a real cluster:

    /usr/bin/python3 tools/objstore_lab.py up --dir /tmp/lab          # mon + osd + radosgw
    eval "$(/usr/bin/python3 tools/objstore_lab.py env --dir /tmp/lab)"  # CEPH_CONF, AWS_* ...
    ... run chunkvol with a RADOS pool `chunkvol` or the S3 bucket `chunkvol` ...
    /usr/bin/python3 tools/objstore_lab.py down --dir /tmp/lab

`up` makes one monitor and one OSD whose objects live in RAM (memstore: fast, gone at `down`),
a pool `chunkvol` with one replica, and with `--rgw` (the default) radosgw's S3 frontend, a user
with the fixed keys below and a bucket `chunkvol`. It returns once an object can really be
written and read back through RADOS (and S3), and writes DIR/lab.json: the conf file, keyring,
pool, endpoint, bucket, keys and the daemons' PIDs. DIR/ceph.conf is enough for a client
(`rados.Rados(conffile=...)`, `ceph -c`, `rados -c`): it names the keyring and sets 10 s client
timeouts, so a stopped lab gives an error instead of a hang.

Everything stays in DIR (data, logs in DIR/log, pid files and admin sockets in DIR/run) and
listens on 127.0.0.1 only: the monitor on --mon-port (default 40301, msgr2 only), the OSD on some
of the next 20 ports, radosgw on --rgw-port (default 40081). A whole `up` takes about 2 s. `down` stops the daemons by the PIDs in DIR/run/*.pid, after checking
that each PID is still a daemon of this lab (its command line names DIR/ceph.conf); it never
stops anything by name. There is no ceph-mgr (300 MB and not needed for I/O); without one a
few `ceph` commands (e.g. `ceph -s` PG stats, `rbd mirror pool status`) wait forever, so use
`timeout` with them.

Tests use the Python API: `Lab(dir).up(rgw=True)` returns the lab.json dict, `.info` reads it,
`.down()` stops the daemons, `.running()` lists those alive (tests/support/objstore_lab.py has the pytest
fixture). Run with
/usr/bin/python3 or the project's venv: python3-rados and python3-boto3 come from Debian.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

# Odd ports on purpose. The 40000s lie in Linux's ephemeral range (32768-60999), and radosgw
# connects to the cluster before it binds its S3 port: an outgoing connection could take that
# port first, and once closed it blocks it for a minute (TIME_WAIT). Linux gives connect()
# even ports only (bind to port 0 gets odd ones), so an odd port is never taken that way.
DEFAULT_MON_PORT = 40301
DEFAULT_RGW_PORT = 40081
OSD_PORT_COUNT = 20  # the OSD binds 4 ports (public, cluster, 2 heartbeats) after the mon's
POOL = "chunkvol"
BUCKET = "chunkvol"
RGW_USER = "chunkvol"
# Fixed on purpose: the lab is local and throw-away, and tests and docs can name these keys.
ACCESS_KEY = "CVTESTACCESSKEY"
SECRET_KEY = "cvtestsecretkey0123456789"
CLIENT_TIMEOUT_SECONDS = 10
RADOS_READY_SECONDS = 60
RGW_READY_SECONDS = 90
STOP_SECONDS = 10
COMMAND_SECONDS = 60
# What `up` creates in DIR: a stale lab is cleaned by removing exactly these, nothing else.
LAB_ENTRIES = ("ceph.conf", "keyring", "monmap", "lab.json", "mon", "osd", "rgw", "run", "log", "crash")


class LabError(Exception):
    """The lab could not do what was asked; the message says which part and why."""


def free_port(start):
    """The first free odd port on 127.0.0.1 from `start` on (odd: see DEFAULT_MON_PORT)."""
    for port in range(start | 1, 65536, 2):
        if _port_is_free(port):
            return port
    raise LabError(f"no free port on 127.0.0.1 from {start} on")


def above_ephemeral(offset=0):
    """A start for free_port above the kernel's range of ephemeral ports: a port from inside it
    can be taken, between our probe and the daemon's bind, as the local port of any process's
    outgoing connection (tests running beside the lab make many)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as limits:
            high = int(limits.read().split()[1])
    except (OSError, ValueError, IndexError):
        high = 60999  # Linux's default
    return min(high + 1 + offset, 65535 - OSD_PORT_COUNT)


def _port_is_free(port):
    with socket.socket() as probe:
        # As the daemons do: a stopped lab's accepted connections in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(pid):
    """True while any thread of `pid` runs. A zombie counts as gone once all its threads are: an
    orphaned daemon may stay a zombie until init reaps it, and by then it holds no ports or
    memory. (The main thread alone may be a zombie while the others still close the sockets.)"""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] not in ("Z", "X"):
                    return True
        except (FileNotFoundError, ProcessLookupError):
            pass
    return False


def _tail(path, lines=5):
    try:
        with open(path, errors="replace") as log:
            text = log.read()[-20000:].strip().splitlines()[-lines:]
    except FileNotFoundError:
        return f"({path} does not exist)"
    return f"last lines of {path}:\n    " + "\n    ".join(text) if text else f"({path} is empty)"


class Lab:
    """One lab in one directory: `up`, `down`, `running()` and `info` (lab.json)."""

    def __init__(self, directory, mon_port=DEFAULT_MON_PORT, rgw_port=DEFAULT_RGW_PORT):
        self.directory = os.path.abspath(directory)
        self.mon_port, self.rgw_port = mon_port, rgw_port
        self.conf = os.path.join(self.directory, "ceph.conf")
        self.keyring = os.path.join(self.directory, "keyring")
        self.started = {}  # {daemon: pid} started by this `up`, watched while waiting

    def path(self, *parts):
        return os.path.join(self.directory, *parts)

    @property
    def info(self):
        """lab.json of the last `up` in this directory."""
        try:
            with open(self.path("lab.json")) as file:
                return json.load(file)
        except FileNotFoundError:
            raise LabError(f"no lab in {self.directory} (no lab.json): run `up` first") from None

    # -- up --------------------------------------------------------------------------------

    def up(self, rgw=True):
        """Start the lab and wait until it serves I/O; returns the lab.json dict. If anything
        fails, the daemons started so far are stopped before the error is raised."""
        started, self.started = time.monotonic(), {}
        os.makedirs(self.directory, exist_ok=True)
        self._prepare_directory(rgw)
        try:
            self._start_cluster()
            cluster_seconds = time.monotonic() - started
            info = self._info(rgw)
            if rgw:
                self._start_rgw()
                info["pids"] = self.running()
            info["startup_seconds"] = {"cluster": round(cluster_seconds, 1),
                                       "total": round(time.monotonic() - started, 1)}
            self._write_json("lab.json", info)
            return info
        except BaseException:
            self.down()
            raise

    def _prepare_directory(self, rgw):
        running = self.running()
        if running:
            names = ", ".join(f"{name} pid {pid}" for name, pid in sorted(running.items()))
            raise LabError(f"{self.directory} already runs a lab ({names}): "
                           f"run `objstore_lab.py down --dir {self.directory}` first")
        for port, what in [(self.mon_port, "--mon-port")] + ([(self.rgw_port, "--rgw-port")] if rgw else []):
            if not _port_is_free(port):
                raise LabError(f"port {port} on 127.0.0.1 is in use (another lab?): choose another {what}")
        for entry in LAB_ENTRIES:  # a stale lab: its daemons are gone, its files are not
            path = self.path(entry)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        for entry in ("mon", "osd", "rgw", "run", "log", "crash"):
            os.makedirs(self.path(entry))

    def _write_conf(self, fsid):
        d = self.directory
        # $name and $cluster are expanded by Ceph. Daemon-only settings (log, pid file, admin
        # socket) sit in the daemons' sections so that clients write nothing into DIR.
        text = f"""\
# Written by tools/objstore_lab.py: a one-mon one-osd lab on 127.0.0.1 (see lab.json).
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{self.mon_port}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
ms bind msgr1 = false
ms bind port min = {self.mon_port + 1}
ms bind port max = {self.mon_port + OSD_PORT_COUNT}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {self.keyring}
run dir = {d}/run
crash dir = {d}/crash
# One OSD: pools have one replica, few PGs (RGW's own pools too) and no autoscaler.
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon max pg per osd = 1000
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# The mon store is tiny: no HEALTH_WARN just because the disk has less than 30 % free.
mon data avail warn = 1
# The mon refuses to start (ENOSPC) when its disk has under 5 % free; a lab on a busy test disk
# must start all the same, since its store is a few MB.
mon data avail crit = 0

[client]
# A stopped or broken lab must give an error, not a hang.
rados mon op timeout = {CLIENT_TIMEOUT_SECONDS}
rados osd op timeout = {CLIENT_TIMEOUT_SECONDS}
client mount timeout = {CLIENT_TIMEOUT_SECONDS}

[mon]
mon data = {d}/mon/$cluster-$id
keyring = {d}/mon/$cluster-$id/keyring
log file = {d}/log/$cluster-$name.log
# The cluster and audit logs would go to /var/log/ceph otherwise.
mon cluster log file = {d}/log/$cluster.$channel.log
pid file = {d}/run/$cluster-$name.pid
admin socket = {d}/run/$name.asok
auth allow insecure global id reclaim = false
# Each osdmap change (pool create, application enable...) waits for the next paxos proposal,
# 1 s apart by default, and radosgw's start-up alone makes a dozen: `up` took 18 s, now 2 s.
paxos propose interval = 0.05

[osd]
osd data = {d}/osd/$cluster-$id
keyring = {d}/osd/$cluster-$id/keyring
osd objectstore = memstore
memstore device bytes = 1073741824
log file = {d}/log/$cluster-$name.log
pid file = {d}/run/$cluster-$name.pid
admin socket = {d}/run/$name.asok

[client.rgw.gw]
keyring = {d}/rgw/keyring
log file = {d}/log/$cluster-$name.log
pid file = {d}/run/$cluster-$name.pid
admin socket = {d}/run/$name.asok
rgw frontends = beast endpoint=127.0.0.1:{self.rgw_port} tcp_nodelay=1
rgw data = {d}/rgw
# beast serves requests on this many threads (512 by default).
rgw thread pool size = 16
# radosgw creates its pools while clients wait: no op timeout for the gateway itself.
rados mon op timeout = 0
rados osd op timeout = 0
client mount timeout = 300
"""
        with open(self.conf, "w") as file:
            file.write(text)

    def _start_cluster(self):
        fsid = str(uuid.uuid4())
        self._write_conf(fsid)
        admin_key = self._run("ceph-authtool", "--gen-print-key").strip()
        mon_key = self._run("ceph-authtool", "--gen-print-key").strip()
        osd_key = self._run("ceph-authtool", "--gen-print-key").strip()
        admin = {"client.admin": (admin_key, {"mon": "allow *", "osd": "allow *", "mgr": "allow *"})}
        _write_keyring(self.keyring, admin)
        # The mon's mkfs keyring seeds its auth database: its own key plus the admin's.
        seed = self.path("mon", "seed.keyring")
        _write_keyring(seed, {"mon.": (mon_key, {"mon": "allow *"}), **admin})
        self._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                  f"[v2:127.0.0.1:{self.mon_port}]", self.path("monmap"))
        self._run("ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap", self.path("monmap"),
                  "--keyring", seed)
        self._daemon("mon.a", "ceph-mon", "-c", self.conf, "-i", "a")
        with self._rados() as cluster:
            # Register the OSD with a key made here (ceph-volume style): `ceph-osd --mkfs --mkkey`
            # alone fails with "failed to fetch mon config".
            osd_uuid = str(uuid.uuid4())
            out = self._mon_command(cluster, {"prefix": "osd new", "uuid": osd_uuid, "format": "json"},
                                    json.dumps({"cephx_secret": osd_key}).encode())
            osd_id = json.loads(out)["osdid"]
            os.makedirs(self.path("osd", f"ceph-{osd_id}"))
            _write_keyring(self.path("osd", f"ceph-{osd_id}", "keyring"), {f"osd.{osd_id}": (osd_key, {})})
            self._run("ceph-osd", "-c", self.conf, "-i", str(osd_id), "--mkfs", "--osd-uuid", osd_uuid)
            self._daemon(f"osd.{osd_id}", "ceph-osd", "-c", self.conf, "-i", str(osd_id))
            self._mon_command(cluster, {"prefix": "osd pool create", "pool": POOL, "pg_num": 8, "pgp_num": 8})
            self._mon_command(cluster, {"prefix": "osd pool application enable", "pool": POOL, "app": "rados"})
            self._wait_rados(cluster, f"osd.{osd_id}")

    def _wait_rados(self, cluster, osd_name):
        """The first write that comes back is the sign that the OSD is up and the pool's PGs are
        active (the write waits for them, up to the 5 s op timeout of this connection)."""
        with cluster.open_ioctx(POOL) as ioctx:
            def probe():
                ioctx.write_full("lab-probe", b"probe")
                ioctx.remove_object("lab-probe")
                return True
            self._wait(f"RADOS pool {POOL}", RADOS_READY_SECONDS, osd_name, probe)

    def _start_rgw(self):
        import boto3
        from botocore.config import Config

        with self._rados() as cluster:
            self._mon_command(cluster, {"prefix": "auth get-or-create", "entity": "client.rgw.gw",
                                        "caps": ["mon", "allow rw", "osd", "allow rwx"]})
            key = json.loads(self._mon_command(cluster, {"prefix": "auth get-key", "entity": "client.rgw.gw",
                                                         "format": "json"}))["key"]
        _write_keyring(self.path("rgw", "keyring"), {"client.rgw.gw": (key, {})})
        endpoint = f"http://127.0.0.1:{self.rgw_port}"

        def answers_http():
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
            except urllib.error.HTTPError:
                pass  # any HTTP answer will do
            return True
        # radosgw makes its pools and the default zone before it listens; radosgw-admin must
        # not race it for the zone, so the user is made once the gateway answers.
        self._daemon("rgw", "radosgw", "-c", self.conf, "-n", "client.rgw.gw")
        self._wait(f"radosgw on {endpoint}", RGW_READY_SECONDS, "rgw", answers_http)
        self._run("radosgw-admin", "-c", self.conf, "user", "create", f"--uid={RGW_USER}",
                  f"--display-name={RGW_USER}", f"--access-key={ACCESS_KEY}", f"--secret={SECRET_KEY}")
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                          config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                        connect_timeout=5, read_timeout=30))

        def s3_round_trip():
            # The bucket index and data pools appear at the first bucket and the first PUT.
            try:
                s3.create_bucket(Bucket=BUCKET)
            except s3.exceptions.BucketAlreadyOwnedByYou:
                pass
            s3.put_object(Bucket=BUCKET, Key="lab-probe", Body=b"probe")
            ok = s3.get_object(Bucket=BUCKET, Key="lab-probe")["Body"].read() == b"probe"
            s3.delete_object(Bucket=BUCKET, Key="lab-probe")
            return ok
        self._wait(f"S3 PUT/GET on {endpoint}", RGW_READY_SECONDS, "rgw", s3_round_trip)

    def _wait(self, what, seconds, daemon, probe):
        """Call probe() until it returns True. Any exception means "not yet" (the errors of a
        starting cluster vary: timeouts, refused connections, 5xx); the last one is reported if
        the time runs out, and a daemon that died ends the wait at once."""
        deadline, last = time.monotonic() + seconds, "not ready"
        while True:
            self._check_daemons()
            try:
                if probe():
                    return
            except Exception as error:
                last = f"{type(error).__name__}: {error}"
            if time.monotonic() > deadline:
                raise LabError(f"{what} not ready after {seconds} s ({last}); {_tail(self._log(daemon))}")
            time.sleep(0.2)

    def _info(self, rgw):
        info = {"dir": self.directory, "ceph_conf": self.conf, "keyring": self.keyring, "rados_pool": POOL,
                "mon_host": f"v2:127.0.0.1:{self.mon_port}", "pids": self.running()}
        if rgw:
            info.update({"s3_endpoint": f"http://127.0.0.1:{self.rgw_port}", "s3_bucket": BUCKET,
                         "s3_region": "us-east-1", "access_key": ACCESS_KEY, "secret_key": SECRET_KEY})
        return info

    # -- helpers ---------------------------------------------------------------------------

    def _run(self, *command):
        """A setup command, with a timeout; its output, or a LabError with its last lines."""
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_SECONDS,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise LabError(f"{command[0]} did not finish in {COMMAND_SECONDS} s: {shlex.join(command)}") from None
        except FileNotFoundError:
            raise LabError(f"{command[0]} is not installed: run `make install`") from None
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise LabError(f"{command[0]} failed (exit {done.returncode}): " + " | ".join(output))
        return done.stdout

    def _daemon(self, name, *command):
        """Start a Ceph daemon. It forks itself into the background; the foreground part exits
        only once the daemon is initialised, with an error status if it could not start."""
        output, pid_file = self.path("log", f"{name}.out"), self.path("run", f"ceph-{_ceph_name(name)}.pid")
        if os.path.exists(pid_file):  # left by an earlier attempt that died: not this daemon's
            os.remove(pid_file)
        with open(output, "w") as out:
            try:
                done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=COMMAND_SECONDS)
            except subprocess.TimeoutExpired:
                raise LabError(f"{name} did not start in {COMMAND_SECONDS} s; {_tail(output)}") from None
            except FileNotFoundError:
                raise LabError(f"{command[0]} is not installed: run `make install`") from None
        if done.returncode != 0:
            raise LabError(f"{name} failed to start (exit {done.returncode}); "
                           f"{_tail(output)}\n{_tail(self._log(name))}")
        deadline = time.monotonic() + 5
        while not os.path.exists(pid_file):
            if time.monotonic() > deadline:
                raise LabError(f"{name} started but wrote no {pid_file}; {_tail(self._log(name))}")
            time.sleep(0.05)
        with open(pid_file) as file:
            self.started[name] = int(file.read().strip())

    def _log(self, name):
        return self.path("log", f"ceph-{_ceph_name(name)}.log")

    def _pid_files(self):
        run = self.path("run")
        names = sorted(os.listdir(run)) if os.path.isdir(run) else []
        return {_lab_name(name[len("ceph-"):-len(".pid")]): os.path.join(run, name)
                for name in names if name.startswith("ceph-") and name.endswith(".pid")}

    def running(self):
        """{daemon: pid} for the daemons of this lab that are running now. A PID only counts if
        that process's command line names this lab's conf file (PIDs get reused)."""
        running = {}
        for name, pid_file in self._pid_files().items():
            try:
                with open(pid_file) as file:
                    pid = int(file.read().strip())
                with open(f"/proc/{pid}/cmdline", "rb") as file:
                    arguments = file.read().split(b"\0")
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
            if self.conf.encode() in arguments and _alive(pid):
                running[name] = pid
        return running

    def _check_daemons(self):
        """While waiting for the lab: a daemon that died is the error to report, not a timeout."""
        for name, pid in self.started.items():
            if not _alive(pid):
                raise LabError(f"{name} exited during start-up; {_tail(self._log(name))}")

    def _rados(self):
        import rados
        cluster = rados.Rados(conffile=self.conf, conf={"rados_osd_op_timeout": "5"})
        try:
            cluster.connect(timeout=CLIENT_TIMEOUT_SECONDS)
        except rados.Error as error:
            raise LabError(f"cannot connect to the monitor on 127.0.0.1:{self.mon_port} ({error}); "
                           f"{_tail(self._log('mon.a'))}") from None
        return _Connection(cluster)

    @staticmethod
    def _mon_command(cluster, command, input_bytes=b""):
        code, out, status = cluster.mon_command(json.dumps(command), input_bytes, timeout=CLIENT_TIMEOUT_SECONDS)
        if code != 0:
            raise LabError(f"`{command['prefix']}` failed: {status or os.strerror(-code)}")
        return out

    def _write_json(self, name, value):
        temporary = self.path(name + ".tmp")
        with open(temporary, "w") as file:
            json.dump(value, file, indent=2)
            file.write("\n")
        os.replace(temporary, self.path(name))

    # -- down ------------------------------------------------------------------------------

    def down(self):
        """Stop this lab's daemons and wait until they are gone; returns {daemon: pid} stopped.
        Clients before servers: radosgw, then the OSD, then the monitor (an OSD that is told to
        stop first tells the monitor, and waits 5 s for an answer if the monitor is gone). Files
        stay (logs for a post-mortem); the next `up` replaces them."""
        running = self.running()
        for group in ("rgw", "osd.", "mon."):
            _stop({name: pid for name, pid in running.items() if name.startswith(group)})
        return running


def _stop(daemons):
    """SIGTERM, then SIGKILL after STOP_SECONDS; LabError if one survives even that."""
    for sig, seconds in ((signal.SIGTERM, STOP_SECONDS), (signal.SIGKILL, 5)):
        for pid in daemons.values():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + seconds
        while any(_alive(pid) for pid in daemons.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        daemons = {name: pid for name, pid in daemons.items() if _alive(pid)}
        if not daemons:
            return
    left = ", ".join(f"{name} pid {pid}" for name, pid in daemons.items())
    raise LabError(f"still running after SIGKILL: {left}")


class _Connection:
    """`with lab._rados() as cluster:` shuts the librados handle down on the way out."""

    def __init__(self, cluster):
        self.cluster = cluster

    def __enter__(self):
        return self.cluster

    def __exit__(self, *exc):
        self.cluster.shutdown()


def _ceph_name(name):
    """The Ceph name of a daemon: lab.json says `rgw`, Ceph `client.rgw.gw`."""
    return "client.rgw.gw" if name == "rgw" else name


def _lab_name(ceph_name):
    return "rgw" if ceph_name == "client.rgw.gw" else ceph_name


def _write_keyring(path, entities):
    """A Ceph keyring file: {entity: (base64 key, {service: capability})}."""
    lines = []
    for entity, (key, caps) in entities.items():
        lines += [f"[{entity}]", f"\tkey = {key}"]
        lines += [f'\tcaps {service} = "{capability}"' for service, capability in caps.items()]
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)


def env_lines(info):
    """Shell lines that point chunkvol at the lab. librados reads CEPH_CONF and boto3 the keys and
    region; AWS_ENDPOINT_URL is read by boto3 >= 1.28 and the aws CLI only (Debian 12 has 1.26), so
    an S3 client there must pass the endpoint itself."""
    values = {"CEPH_CONF": info["ceph_conf"]}
    if "s3_endpoint" in info:
        values.update({"AWS_ACCESS_KEY_ID": info["access_key"], "AWS_SECRET_ACCESS_KEY": info["secret_key"],
                       "AWS_DEFAULT_REGION": info["s3_region"], "AWS_ENDPOINT_URL": info["s3_endpoint"]})
    lines = [f"export {name}={shlex.quote(value)}" for name, value in values.items()]
    lines.append(f"# RADOS pool: {info['rados_pool']}"
                 + (f"; S3 bucket: {info['s3_bucket']} at {info['s3_endpoint']}" if "s3_endpoint" in info else ""))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "env"])
    parser.add_argument("--dir", required=True, help="the lab's directory (created if missing)")
    parser.add_argument("--rgw", action=argparse.BooleanOptionalAction, default=True,
                        help="also start radosgw (S3); default: yes")
    odd = "; best an odd number: outgoing connections never take those"
    parser.add_argument("--mon-port", type=int, default=DEFAULT_MON_PORT,
                        help=f"the monitor's port; the OSD takes some of the next {OSD_PORT_COUNT}{odd} "
                             f"(default {DEFAULT_MON_PORT})")
    parser.add_argument("--rgw-port", type=int, default=DEFAULT_RGW_PORT,
                        help=f"radosgw's S3 port{odd} (default {DEFAULT_RGW_PORT})")
    arguments = parser.parse_args(argv)
    os.environ["PATH"] = "/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", "")
    lab = Lab(arguments.dir, arguments.mon_port, arguments.rgw_port)
    try:
        if arguments.command == "up":
            info = lab.up(rgw=arguments.rgw)
            print(f"lab up in {info['startup_seconds']['total']} s "
                  f"(RADOS ready at {info['startup_seconds']['cluster']} s): {lab.path('lab.json')}")
            print("\n".join(env_lines(info)))
        elif arguments.command == "down":
            stopped = lab.down()
            names = ", ".join(f"{name} ({pid})" for name, pid in sorted(stopped.items()))
            print(f"stopped {names}" if names else "nothing to stop: no daemon of this lab runs")
        else:
            print("\n".join(env_lines(lab.info)))
            if not lab.running():
                print(f"objstore_lab: warning: the lab in {lab.directory} is not running", file=sys.stderr)
    except LabError as error:
        print(f"objstore_lab: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
