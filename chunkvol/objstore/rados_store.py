"""A Ceph RADOS pool as an object store (python3-rados, Debian's binding of librados).

The cluster is named by its config file; the keyring and the client name come from it, as
for the `rados` command (CEPH_ARGS works too). Client timeouts are set so that a cluster
that does not answer is a retried error, not a hang. An object is written whole with
write_full (atomic on the OSD); objects stay under osd_max_write_size (90 MiB by default).
A fault drops the connection, so the next attempt starts from a fresh handle.
"""

from chunkvol.errors import NotFoundError
from chunkvol.objstore.store import ObjectStore, TransientError, denied, missing

TIMEOUT_SECONDS = "10"
CLIENT_OPTIONS = {"rados_mon_op_timeout": TIMEOUT_SECONDS, "rados_osd_op_timeout": TIMEOUT_SECONDS,
                  "client_mount_timeout": TIMEOUT_SECONDS}


class RadosStore(ObjectStore):
    def __init__(self, url, conf_path, pool):
        import rados
        self.rados = rados
        self.url = url
        self.conf_path = conf_path
        self.pool = pool
        self.cluster = None
        self.ioctx = None

    def _connect(self):
        if self.ioctx is not None:
            return self.ioctx
        rados = self.rados
        try:
            cluster = rados.Rados(conffile=self.conf_path, conf=dict(CLIENT_OPTIONS))
        except rados.Error as error:
            raise NotFoundError(f"{self.url}: cannot read the Ceph config {self.conf_path} ({error})") from None
        try:
            cluster.connect(timeout=int(TIMEOUT_SECONDS))
            self.ioctx = cluster.open_ioctx(self.pool)
        except rados.PermissionDeniedError as error:
            cluster.shutdown()
            raise denied(self.url, "connect", error) from None
        except rados.ObjectNotFound:
            cluster.shutdown()
            raise NotFoundError(f"{self.url}: no RADOS pool {self.pool} (or no keyring) in that cluster") from None
        except rados.Error as error:
            cluster.shutdown()
            raise TransientError(f"connect: {error}") from None
        self.cluster = cluster
        return self.ioctx

    def _call(self, what, name, method, *arguments):
        rados = self.rados
        ioctx = self._connect()
        try:
            return getattr(ioctx, method)(*arguments)
        except rados.ObjectNotFound:
            raise missing(self.url, name) from None
        except rados.PermissionDeniedError as error:
            raise denied(self.url, what, error) from None
        except rados.Error as error:
            self.close()  # a timed-out handle is not reused
            raise TransientError(f"{what} {name}: {error}") from None

    def _raw_put(self, name, data):
        self._call("put", name, "write_full", name, bytes(data))

    def _raw_get(self, name, offset, length):
        if length is None:
            length = max(0, self._raw_size(name) - offset)
        if length == 0:
            return b""
        return self._call("get", name, "read", name, length, offset)

    def _raw_size(self, name):
        return self._call("stat", name, "stat", name)[0]

    def _raw_list(self, prefix):
        rados = self.rados
        ioctx = self._connect()
        try:
            return [item.key for item in ioctx.list_objects() if item.key.startswith(prefix)]
        except rados.Error as error:
            self.close()
            raise TransientError(f"list: {error}") from None

    def _raw_delete(self, name):
        self._call("delete", name, "remove_object", name)

    def close(self):
        if self.ioctx is not None:
            self.ioctx.close()
            self.ioctx = None
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
