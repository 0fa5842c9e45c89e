"""The `chunkvol` command: noun then verb, in the manner of rbd and zfs."""
