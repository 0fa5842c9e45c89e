"""Acceptance test: the kernel's own NBD client (nbd-client + nbd.ko, /dev/nbd0) on a chunkvol
volume, in a qemu (TCG) guest, across a kill -9 of the server.

The host has no nbd module, so the client runs in the guest tools/guest/kernel_nbd.py boots
(initramfs only: busybox, nbd-client, mke2fs, e2fsck).  The guest reaches the server's Unix
socket through qemu's restricted user network: its connections to 10.0.2.100:10809 are handed
to one `socat - UNIX-CONNECT:SOCKET` each, so nothing leaves this machine and a new connection
after a server restart reaches the new server.  The host drives the guest with one shell
command at a time over the guest's second serial port and waits for each one's answer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.realclients import VOLUME, check_pool, make_pool, stop_cleanly
from tools.guest import fs, kernel_nbd
from tools.guest.kernel_nbd import DEVICE, GUEST_HOST, GUEST_PORT
from tools.guest.nbdfuse import attached

pytestmark = [pytest.mark.realclients, pytest.mark.vm]

# What a user types in the guest (README: "The kernel's NBD client").
ATTACH = f"nbd-client {GUEST_HOST} {GUEST_PORT} {DEVICE} -N {VOLUME}"
DETACH = f"nbd-client -d {DEVICE}"
MANIFEST = "MANIFEST.sha256"


def _manifest_problems(root: Path, digest: dict[str, str]) -> list[str]:
    """Files under ROOT (tree_digest of it) against ROOT/MANIFEST.sha256 the guest wrote."""
    listed = {}
    for line in (root / MANIFEST).read_text().splitlines():
        sha, name = line.split(None, 1)
        listed[name.removeprefix("./")] = sha
    files = {name: desc.split()[2] for name, desc in digest.items() if desc.startswith("file ") and name != MANIFEST}
    problems = [f"{root.name}: not in the manifest: {n}" for n in sorted(files.keys() - listed.keys())]
    problems += [f"{root.name}: missing: {n}" for n in sorted(listed.keys() - files.keys())]
    problems += [f"{root.name}: differs: {n}" for n in sorted(files.keys() & listed.keys()) if files[n] != listed[n]]
    return problems


def _read_on_host(server, tmp_path: Path, *names: str) -> dict[str, dict[str, str]]:
    """The volume through a second connection (nbdfuse + loop, read-only): e2fsck -fn clean,
    mounted ro, each tree NAME matches its manifest; returns each tree's digest."""
    with attached(server.socket_path, VOLUME, tmp_path, readonly=True) as dev:
        check = fs.fsck(dev, "ext4")
        assert check.clean, str(check)
        with fs.mounted(dev, tmp_path / "host-mnt", fstype="ext4", options="ro") as mnt:
            digests = {name: fs.tree_digest(mnt / name) for name in names}
            problems = [p for name in names for p in _manifest_problems(mnt / name, digests[name])]
    assert problems == [], "\n".join(problems)
    return digests


def _manifest_sha(digest: dict[str, str]) -> str:
    return digest[MANIFEST].split()[2]


def _connections(vm: kernel_nbd.NbdGuest) -> int:
    """Connections the guest has made to the forwarded address (one socat each)."""
    return len(vm.socat_pids.read_text().split())


def test_kernel_client_ext4_across_server_kill9(tmp_path, server_factory):
    """nbd-client attaches the volume as /dev/nbd0 in the guest; ext4 on it; kill -9 of the
    server under the mounted, synced filesystem; restart; every synced file is there.

    1. guest: attach, mkfs.ext4, mount, write tree "first" (random files and a manifest of
       their sha256), freeze the filesystem (fsfreeze: journal checkpointed, flushed);
    2. host, through a second connection: e2fsck -fn clean, mounted ro, "first" matches the
       manifest whose hash the guest printed;
    3. guest: thaw, write tree "second", sync (flushed, the journal not checkpointed);
    4. host: kill -9 the server (by PID); once the guest's kernel reports the connection
       lost (console), restart the server on the same pool and socket;
    5. guest: re-attaches explicitly -- `nbd-client -d` first, umount (the dead device refuses
       the journal's superblock update), the same `nbd-client` command again, mount (journal
       replay); both trees match their manifests (read from the device, caches dropped);
       writes tree "third", syncs, unmounts, `e2fsck -fn /dev/nbd0` is clean (its result
       line), detaches;
    6. host: e2fsck -fn clean, all three trees match, "first" byte-identical to step 2;
       `chunkvol check` clean.

    Re-attach, not reconnection: nbd-client 3.24 cannot reconnect a device on this kernel
    (6.1).  By default it configures the device over netlink and exits, and there `-persist`
    is ignored (persist over netlink, NBD_CMD_RECONFIGURE, came in nbd 3.27).  With
    `-nonetlink -persist` it waits in the NBD_DO_IT ioctl, but the kernel returns 0 from it
    when the server closes the connection (an error only on a timeout), so nbd-client takes
    it for a clean disconnect and exits without connecting again (tried: no second
    connection).  And the device cannot be attached again while its filesystem is mounted
    (the kernel: "nbd0 already in use"), so the guest unmounts it first.  Step 5 checks that
    the device stays dead with the server back up and that the guest made no second
    connection by itself.

    Why detach before umount: a request the guest sent in the moment between the kill and its
    kernel seeing the connection close (ext4 prefetches block bitmaps in the background) is
    never answered, and without `-timeout` the kernel waits for it forever; umount would then
    hang flushing the device's cache.  `nbd-client -d` fails such requests with EIO.
    """
    pool = make_pool(tmp_path)
    server = server_factory(pool)
    with kernel_nbd.booted(server.socket_path, tmp_path / "guest") as vm:
        # 1.
        assert "Connected /dev/nbd0" in vm.run(ATTACH).output
        vm.run(f"mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 {DEVICE}")
        vm.run(f"mount -t ext4 {DEVICE} /mnt")
        first = vm.run("write_tree /mnt/first 24").fields
        vm.run("fsfreeze --freeze /mnt")
        # 2.
        host_first = _read_on_host(server, tmp_path, "first")["first"]
        assert _manifest_sha(host_first) == first["manifest_sha256"]
        # 3.
        vm.run("fsfreeze --unfreeze /mnt")
        second = vm.run("write_tree /mnt/second 12 && sync").fields
        # 4.
        mark = vm.console_mark()
        server.kill()
        # Only once the guest's kernel has seen the connection drop: a request sent before that
        # would wait for its answer forever (no -timeout: the kernel never times a request out).
        vm.wait_console("block nbd0: Receive control failed", since=mark)
        server.start()
        # 5.
        dead = vm.run(f"dd if={DEVICE} of=/dev/null bs=4096 count=1 iflag=direct", check=False)
        assert dead.returncode != 0, f"the device reads again without a re-attach:\n{dead.output}"
        assert _connections(vm) == 1
        stuck = vm.run(f"cat /sys/block/{Path(DEVICE).name}/inflight").output.split()
        vm.run(DETACH)  # first: it fails the requests the dead connection left in flight
        vm.run("umount /mnt")
        assert "Connected /dev/nbd0" in vm.run(ATTACH).output
        assert _connections(vm) == 2
        vm.run(f"mount -t ext4 {DEVICE} /mnt")
        assert vm.run("check_tree /mnt/first").fields == {"verified": "25",
                                                          "manifest_sha256": first["manifest_sha256"]}
        assert vm.run("check_tree /mnt/second").fields == {"verified": "13",
                                                           "manifest_sha256": second["manifest_sha256"]}
        third = vm.run("write_tree /mnt/third 12 && sync").fields
        vm.run("umount /mnt")
        vm.run(f"fsck_report {DEVICE}")
        vm.run(DETACH)
        assert vm.poweroff() == 0
        assert vm.result_line() == f"OK fsck=clean device={DEVICE}"
        print(f"kernel nbd client: boot {vm.boot_seconds:.1f}s, wrote {first['bytes']}+{second['bytes']}"
              f"+{third['bytes']} bytes; requests the kill left in flight (read, write): {stuck}")
    # 6.
    trees = _read_on_host(server, tmp_path, "first", "second", "third")
    assert trees["first"] == host_first
    assert _manifest_sha(trees["second"]) == second["manifest_sha256"]
    assert _manifest_sha(trees["third"]) == third["manifest_sha256"]
    stop_cleanly(server)
    check_pool(pool)
