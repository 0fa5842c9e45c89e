"""`chunkvol volume create|list|remove|resize|promote`."""

import json

from chunkvol.cli.common import open_pool_for_reading, run_operation
from chunkvol.cli.sizes import format_size, parse_size
from chunkvol.pool import COMPRESSIONS, VOLUME_MODES


def register(commands):
    volume = commands.add_parser("volume", help="create, list, resize and remove volumes")
    verbs = volume.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    create = verbs.add_parser("create", help="create a volume")
    create.add_argument("name")
    create.add_argument("--size", required=True, help="size, e.g. 4G")
    create.add_argument("--compression", choices=COMPRESSIONS, default="none")
    create.add_argument("--mode", choices=VOLUME_MODES, help="with peers: single-primary (the default: one node "
                                                             "writes, the others read) or multi-master (all write)")
    create.set_defaults(run=create_volume)

    promote = verbs.add_parser("promote", help="make this node the writer of a single-primary volume")
    promote.add_argument("name")
    promote.set_defaults(run=promote_volume)

    listing = verbs.add_parser("list", aliases=["ls"], help="list volumes")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=list_volumes)

    remove = verbs.add_parser("remove", aliases=["rm"], help="remove a volume and its data")
    remove.add_argument("name")
    remove.add_argument("--with-snapshots", action="store_true", help="remove its snapshots too")
    remove.set_defaults(run=remove_volume)

    resize = verbs.add_parser("resize", help="grow a volume")
    resize.add_argument("name")
    resize.add_argument("--size", required=True)
    resize.set_defaults(run=resize_volume)


def create_volume(arguments):
    size = parse_size(arguments.size)
    info = run_operation(arguments.pool, "volume_create", name=arguments.name, size=size,
                         compression=arguments.compression, mode=arguments.mode)
    mode = f", {info['mode']}" if info.get("mode") else ""
    print(f"created volume {info['name']}: {format_size(info['size'])}, compression {info['compression']}{mode}")


def promote_volume(arguments):
    info = run_operation(arguments.pool, "volume_promote", name=arguments.name)
    print(f"this node (node {info['primary']}) now writes volume {info['name']}; the other nodes serve it "
          "read-only from the moment they receive this (reconnect clients to write)")


def list_volumes(arguments):
    with open_pool_for_reading(arguments.pool) as pool:
        rows = [pool.volumes[name].as_dict() for name in sorted(pool.volumes)]
    for row in rows:
        row.pop("created_hlc", None)
    if arguments.json:
        print(json.dumps(rows, indent=2))
        return
    modes = any(row.get("mode") for row in rows)  # a pool with peers: who writes what
    print(f"{'NAME':<24} {'SIZE':>12} {'COMPRESSION':<11}" + (f" {'MODE':<14} PRIMARY" if modes else ""))
    for row in rows:
        extra = ""
        if modes:
            extra = f" {row.get('mode') or '-':<14} {row.get('primary') or '-'}"
            extra += "  SPLIT BRAIN (see `chunkvol conflicts`)" if row.get("split_brain") else ""
        print(f"{row['name']:<24} {format_size(row['size']):>12} {row['compression']:<11}{extra}")


def remove_volume(arguments):
    run_operation(arguments.pool, "volume_remove", name=arguments.name, with_snapshots=arguments.with_snapshots)
    print(f"removed volume {arguments.name}")


def resize_volume(arguments):
    size = parse_size(arguments.size)
    info = run_operation(arguments.pool, "volume_resize", name=arguments.name, size=size)
    print(f"volume {info['name']} is now {format_size(info['size'])}")
