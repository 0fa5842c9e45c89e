"""Entry point of `chunkvol`: parses arguments, runs one command, maps errors to exit codes.

Exit codes (scripts rely on them):
  0 success; 1 operation failed; 2 bad usage; 3 not found; 4 already exists;
  5 pool busy; 6 data corruption found; 7 out of space;
  8 an encrypted mirror's key is missing, wrong or unreadable (or given for an unencrypted one).
"""

import argparse
import os
import sys

from chunkvol import errors
from chunkvol.cli import (check_command, chunk_commands, compact_command, history_commands, inspect_command, key_commands,
                          mirror_commands, node_commands, peer_commands, pool_commands, restore_command, scrub_command,
                          serve_command, status_command, volume_commands)

EXIT_CODES = (
    (errors.UsageError, 2),
    (errors.NotFoundError, 3),
    (errors.AlreadyExistsError, 4),
    (errors.PoolBusyError, 5),
    (errors.CorruptionError, 6),
    (errors.OutOfSpaceError, 7),
    (errors.StoreKeyError, 8),
    (errors.ChunkvolError, 1),
)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors are one line on stderr (exit 2), like every other chunkvol error;
    `chunkvol ... --help` still prints the whole usage."""

    def error(self, message):
        self.exit(2, f"chunkvol: error: {message} (see `{self.prog} --help`)\n")


def build_parser():
    parser = OneLineParser(prog="chunkvol", description="Volumes on a log-structured chunk store, served over NBD.")
    parser.add_argument("--pool", default=os.environ.get("CHUNKVOL_POOL"),
                        help="pool directory (default: $CHUNKVOL_POOL)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    commands.required = True
    pool_commands.register(commands)
    volume_commands.register(commands)
    serve_command.register(commands)
    status_command.register(commands)
    check_command.register(commands)
    inspect_command.register(commands)
    history_commands.register(commands)
    compact_command.register(commands)
    mirror_commands.register(commands)
    node_commands.register(commands)
    scrub_command.register(commands)
    restore_command.register(commands)
    chunk_commands.register(commands)
    peer_commands.register(commands)
    key_commands.register(commands)
    return parser


def main(argv=None):
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.pool is None and getattr(arguments, "needs_pool", True):
        parser.error("--pool PATH (or CHUNKVOL_POOL) is required")
    try:
        return arguments.run(arguments) or 0
    except errors.ChunkvolError as error:
        print(f"chunkvol: {error}", file=sys.stderr)
        for kind, code in EXIT_CODES:
            if isinstance(error, kind):
                return code
        return 1
    except BrokenPipeError:  # `chunkvol status | head`: the reader has what it wanted
        return 1
    except OSError as error:  # the system said no (permissions, a file where a folder should be)
        where = f" ({error.filename})" if error.filename else ""
        print(f"chunkvol: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
