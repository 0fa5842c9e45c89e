"""Drive real NBD clients (kernel filesystems via nbdfuse+loop, qemu, user-mode-linux)
against any NBD export given as (unix socket path, export name).

Modules: nbdkit (start a server), nbdfuse (export -> loop device), fs (mkfs,
mount, fsck, tree compare), export (nbdcopy/nbdinfo), build_initramfs (cached
guest images), vm (qemu), uml (user-mode-linux), guest (the marker round trip).
"""
