"""`chunkvol init`."""

from chunkvol.cli.sizes import format_size, parse_size
from chunkvol.mirror import identity
from chunkvol.pool import CACHE_MODES, DEFAULT_CHUNK_SIZE, Pool


def register(commands):
    init = commands.add_parser("init", help="create a pool")
    init.add_argument("--chunk-size", default=str(DEFAULT_CHUNK_SIZE), help="chunk capacity (default 8G, at least 16M)")
    init.add_argument("--chunk-dir", action="append", dest="chunk_dirs", metavar="DIR",
                      help="directory for chunk files (repeat for several disks; default POOL/chunks)")
    init.add_argument("--cache", choices=CACHE_MODES, default="writeback",
                      help="how the server writes the log: writeback (through the page cache: reads of "
                           "recent data are fast) or none (O_DIRECT, as qemu's cache=none: sustained "
                           "writes several times faster here, reads come from the disk)")
    init.add_argument("--join", metavar="FILE", help="join an existing pool as a new node (a file from "
                      "`chunkvol join-file` on its founding node); it starts as a mirror of that node")
    init.set_defaults(run=init_pool)


def init_pool(arguments):
    if arguments.join:
        document = identity.read_join(arguments.join)
        path = Pool.create(arguments.pool, chunk_size=document["chunk_size"], node_id=document["node_id"],
                           pool_uuid=bytes.fromhex(document["pool_uuid"]), mirror_of=document["issued_by"],
                           cache=arguments.cache)
        identity.install_join(path, document)
        with Pool.open(path):
            pass
        print(f"joined pool {document['pool_uuid']} at {path} as node {document['node_id']} (a mirror of node "
              f"{document['issued_by']}); `chunkvol --pool {arguments.pool} receive --listen HOST:PORT` "
              "takes its records")
        return
    size = parse_size(arguments.chunk_size)
    path = Pool.create(arguments.pool, chunk_size=size, chunk_dirs=arguments.chunk_dirs,
                       cache=arguments.cache)
    with Pool.open(path):
        pass
    print(f"created pool {path} with {format_size(size)} chunks")
