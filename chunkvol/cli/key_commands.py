"""`chunkvol key generate|fingerprint PATH`: the key files of encrypted object-store mirrors
(format/store_key.py). No pool is needed: a key is made before the mirror that uses it, and
checked on a machine that has only the key (a restore)."""

import json
import os

from chunkvol.objstore.keys import generate_key, load_key


def register(commands):
    key = commands.add_parser("key", help="key files of encrypted object-store mirrors")
    actions = key.add_subparsers(dest="action", metavar="ACTION", parser_class=type(key))
    actions.required = True
    generate = actions.add_parser("generate", help="write a new random 256-bit key (mode 0600, never over a file)")
    generate.add_argument("path")
    generate.add_argument("--json", action="store_true")
    generate.set_defaults(run=key_generate, needs_pool=False)
    fingerprint = actions.add_parser("fingerprint", help="the fingerprint of a key file (to tell keys apart)")
    fingerprint.add_argument("path")
    fingerprint.add_argument("--json", action="store_true")
    fingerprint.set_defaults(run=key_fingerprint, needs_pool=False)


def _show(arguments, key, message):
    if arguments.json:
        print(json.dumps({"path": key.path, "fingerprint": key.fingerprint}, indent=2))
    else:
        print(message)


def key_generate(arguments):
    key = generate_key(os.path.abspath(arguments.path))
    _show(arguments, key, f"key {key.fingerprint} written to {key.path}. Keep a copy away from this machine and "
                          "the store (on paper or in a password manager): without it an encrypted mirror cannot "
                          "be read by anyone, you included")


def key_fingerprint(arguments):
    key = load_key(os.path.abspath(arguments.path))
    _show(arguments, key, f"{key.fingerprint}  {key.path}")
