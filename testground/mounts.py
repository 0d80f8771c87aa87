"""A node's instances folder on a tmpfs of a given size, so a test can fill it (ground.add_node)."""

from __future__ import annotations

import os
import pathlib

from testground import procs
from testground.procs import TestGroundError


def tmpfs(folder: pathlib.Path, mib: int) -> None:
    """A tmpfs of ``mib`` MiB on ``folder`` (an earlier one there is unmounted first)."""
    unmount(folder)
    folder.mkdir(parents=True, exist_ok=True)
    procs.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0755", "tmpfs", str(folder)],
        f"mounting a {mib} MiB tmpfs on {folder}",
        "run as root, where mount works",
    )
    # QEMU opens instance disks with O_DIRECT (cache='none'), which tmpfs takes only since Linux 6.6.
    probe = folder / ".o_direct"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600))
    except OSError as exc:
        unmount(folder)
        raise TestGroundError(
            f"this kernel's tmpfs refuses O_DIRECT ({exc}), which QEMU's disks need (cache='none'); "
            "run on Linux 6.6 or later"
        ) from exc
    finally:
        probe.unlink(missing_ok=True)


def unmount(folder: pathlib.Path) -> None:
    """Unmount whatever add_node mounted on ``folder`` (nothing when it is a plain folder)."""
    while os.path.ismount(folder):
        procs.run(
            ["umount", str(folder)], f"unmounting {folder}", "see which process still uses it (fuser -m)"
        )
