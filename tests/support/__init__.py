"""Helpers shared by test modules (import from here, not from another test module).

The tests are laid out like the package: tests/format/, tests/log/, tests/volume/,
tests/history/, tests/mirror/, tests/objstore/, tests/cli/, tests/nbd/, plus tests/realclients/.
Fixtures used in more than one module are in a conftest.py: tests/conftest.py (pools, servers,
the object-store lab) and tests/mirror/conftest.py (`serves`, `store_env`).
"""
