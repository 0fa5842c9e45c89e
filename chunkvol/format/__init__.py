"""On-disk formats: one pure module per structure. These modules never open files.

All integers are little-endian unless a module says otherwise (LMDB keys are big-endian so
that byte order sorts like numbers). Checksums are xxh3-64.
"""
