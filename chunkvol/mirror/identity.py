"""Who is a node of this pool: certificates derived from the pool identity, in POOL/keys/.

- The founding node holds the pool's authority: `ca.key` and the self-signed `ca.crt`, whose
  subject names the pool uuid. It never leaves that node.
- Every node holds `node.key` and `node.crt`, signed by the authority, whose subject names
  the pool uuid and the node id: `chunkvol pool <uuid> node <id>`.
- `join-file` issues a new node id with its key and certificate (and the authority's
  certificate, not its key) into one file, mode 0600: whoever holds it can join once.

Replication runs over mutual TLS: both sides present their node certificate and accept only
one signed by this pool's authority whose subject names this pool; anything else fails the
handshake. Keys are ECDSA P-256; files are PEM, mode 0600, in a 0700 directory.
"""

import datetime
import json
import os
import ssl

from chunkvol.errors import FormatError, NotFoundError, PeerError, UsageError

KEYS_DIRECTORY = "keys"
VALID_DAYS = 3650
JOIN_KIND = "chunkvol-join"


def _crypto():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    return x509, hashes, serialization, ec, NameOID


def keys_path(pool_path, name=""):
    return os.path.join(pool_path, KEYS_DIRECTORY, name)


def subject_of(pool_uuid_hex, node_id=None):
    return f"chunkvol pool {pool_uuid_hex}" + ("" if node_id is None else f" node {node_id}")


def _write_private(path, data):
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(path + ".tmp", path)


def _new_key():
    _, _, _, ec, _ = _crypto()
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key):
    _, _, serialization, _, _ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject, public_key, issuer, signing_key, authority):
    x509, hashes, serialization, _, NameOID = _crypto()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=authority, path_length=None), critical=True))
    return builder.sign(signing_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def ensure_authority(pool_path, fields):
    """Create this pool's authority and this node's certificate if the pool has none (the
    founding node, at its first replication command)."""
    directory = keys_path(pool_path)
    if os.path.exists(os.path.join(directory, "node.crt")):
        return
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    _, _, serialization, _, _ = _crypto()
    authority_subject = subject_of(fields["pool_uuid"])
    authority_key = _new_key()
    authority_cert = _certificate(authority_subject, authority_key.public_key(), authority_subject, authority_key, True)
    node_key = _new_key()
    node_cert = _certificate(subject_of(fields["pool_uuid"], fields["node_id"]), node_key.public_key(),
                             authority_subject, authority_key, False)
    _write_private(os.path.join(directory, "ca.key"), _pem_key(authority_key))
    _write_private(os.path.join(directory, "ca.crt"), authority_cert)
    _write_private(os.path.join(directory, "node.key"), _pem_key(node_key))
    _write_private(os.path.join(directory, "node.crt"), node_cert)


def issued_nodes(pool_path):
    """Node ids this node has issued join files for (POOL/keys/issued, one per line)."""
    try:
        with open(keys_path(pool_path, "issued")) as handle:
            return [int(line) for line in handle.read().split() if line.isdigit()]
    except FileNotFoundError:
        return []


def issue_join(pool_path, fields, node_id):
    """The contents of a join file for a new node `node_id` (bytes, JSON)."""
    ensure_authority(pool_path, fields)
    x509, _, serialization, _, _ = _crypto()
    authority_path = keys_path(pool_path, "ca.key")
    if not os.path.exists(authority_path):
        raise NotFoundError("this node does not hold the pool's authority (ca.key): issue join files on the "
                            "node that created the pool")
    with open(authority_path, "rb") as handle:
        authority_key = serialization.load_pem_private_key(handle.read(), password=None)
    with open(keys_path(pool_path, "ca.crt"), "rb") as handle:
        authority_cert = handle.read()
    node_key = _new_key()
    node_cert = _certificate(subject_of(fields["pool_uuid"], node_id), node_key.public_key(),
                             subject_of(fields["pool_uuid"]), authority_key, False)
    document = {"format": JOIN_KIND, "version": 1, "pool_uuid": fields["pool_uuid"],
                "chunk_size": fields["chunk_size"], "node_id": node_id, "issued_by": fields["node_id"],
                "ca_cert": authority_cert.decode(), "node_cert": node_cert.decode(),
                "node_key": _pem_key(node_key).decode()}
    note_issued(pool_path, node_id)
    return (json.dumps(document, indent=2) + "\n").encode()


def note_issued(pool_path, node_id):
    """Remember that `node_id` was handed out (a join file, a dir: mirror), so that no later
    node of this pool takes its index."""
    os.makedirs(os.path.dirname(keys_path(pool_path, "issued")), exist_ok=True)
    issued = issued_nodes(pool_path) + [node_id]
    _write_private(keys_path(pool_path, "issued"), "".join(f"{each}\n" for each in issued).encode())


def read_join(path):
    try:
        with open(path, "rb") as handle:
            document = json.loads(handle.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"not a join file: {error}", path) from None
    if not isinstance(document, dict) or document.get("format") != JOIN_KIND or document.get("version") != 1:
        raise FormatError("not a chunkvol join file", path)
    for key, kind in (("pool_uuid", str), ("chunk_size", int), ("node_id", int), ("issued_by", int),
                      ("ca_cert", str), ("node_cert", str), ("node_key", str)):
        if not isinstance(document.get(key), kind):
            raise FormatError(f"join file field {key!r} missing or of the wrong type", path)
    return document


def install_join(pool_path, document):
    directory = keys_path(pool_path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    for name, key in (("ca.crt", "ca_cert"), ("node.crt", "node_cert"), ("node.key", "node_key")):
        _write_private(os.path.join(directory, name), document[key].encode())


def _context(pool_path, purpose):
    for name in ("ca.crt", "node.crt", "node.key"):
        if not os.path.exists(keys_path(pool_path, name)):
            raise NotFoundError(f"this pool has no replication keys ({keys_path(pool_path, name)} is missing): "
                                "the founding node makes them; others join with `init --join FILE`")
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(keys_path(pool_path, "node.crt"), keys_path(pool_path, "node.key"))
    context.load_verify_locations(keys_path(pool_path, "ca.crt"))
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = False  # identity is the certificate's subject, checked by peer_node
    return context


def server_context(pool_path):
    return _context(pool_path, ssl.PROTOCOL_TLS_SERVER)


def client_context(pool_path):
    return _context(pool_path, ssl.PROTOCOL_TLS_CLIENT)


def peer_node(tls_socket, pool_uuid_hex):
    """The node id in the peer's certificate (signed by this pool's authority: the handshake
    checked that), or PeerError when it names another pool."""
    certificate = tls_socket.getpeercert()
    subject = dict(item[0] for item in certificate.get("subject", ()))
    words = subject.get("commonName", "").split()
    if len(words) != 5 or words[:2] != ["chunkvol", "pool"] or words[3] != "node" or not words[4].isdigit():
        raise PeerError(f"peer certificate subject {subject.get('commonName')!r} is not a chunkvol node")
    if words[2] != pool_uuid_hex:
        raise PeerError(f"peer is a node of pool {words[2]}, not of this pool ({pool_uuid_hex})")
    return int(words[4])


def check_writable_file(path):
    if os.path.exists(path):
        raise UsageError(f"{path} exists; a join file is never overwritten")
