"""`chunkvol volume create|list|remove|resize`."""

import json

from chunkvol.cli.common import open_pool_for_reading, run_operation
from chunkvol.cli.sizes import format_size, parse_size
from chunkvol.pool import COMPRESSIONS


def register(commands):
    volume = commands.add_parser("volume", help="create, list, resize and remove volumes")
    verbs = volume.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    create = verbs.add_parser("create", help="create a volume")
    create.add_argument("name")
    create.add_argument("--size", required=True, help="size, e.g. 4G")
    create.add_argument("--compression", choices=COMPRESSIONS, default="none")
    create.set_defaults(run=create_volume)

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
                         compression=arguments.compression)
    print(f"created volume {info['name']}: {format_size(info['size'])}, compression {info['compression']}")


def list_volumes(arguments):
    with open_pool_for_reading(arguments.pool) as pool:
        rows = [pool.volumes[name].as_dict() for name in sorted(pool.volumes)]
    for row in rows:
        row.pop("created_hlc", None)
    if arguments.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'NAME':<24} {'SIZE':>12} {'COMPRESSION':<11}")
    for row in rows:
        print(f"{row['name']:<24} {format_size(row['size']):>12} {row['compression']:<11}")


def remove_volume(arguments):
    run_operation(arguments.pool, "volume_remove", name=arguments.name, with_snapshots=arguments.with_snapshots)
    print(f"removed volume {arguments.name}")


def resize_volume(arguments):
    size = parse_size(arguments.size)
    info = run_operation(arguments.pool, "volume_resize", name=arguments.name, size=size)
    print(f"volume {info['name']} is now {format_size(info['size'])}")
