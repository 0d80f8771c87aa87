"""The instance folder: which file is which disk, and the device names the guest sees them under."""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Collection

from kubenova.driver.base import DriverError

ROOT, CONFIG_DRIVE, UNRESCUE, RESCUE_DISK = "disk", "disk.config", "unrescue.xml", "disk.rescue"
SWAP, EPHEMERAL, VOLUME = "disk.swap", "disk.eph.", "disk.vol."
#: In an instance's folder, one path a line: the store volumes a migration's copy made on this host (a
#: target), and those a live transfer under way takes away (a source); see Migration.drop_volume_copies.
INCOMING_VOLUMES, OUTGOING_VOLUMES = "incoming-volumes", "outgoing-volumes"


def bounded(file_name: str) -> str:
    """A file name within the 255 bytes a file system allows: a longer one is cut and ends in a digest of the
    whole, so it stays unique (store names may have 253 characters, before any prefix or suffix)."""
    if len(file_name.encode()) <= 255:
        return file_name
    return f"{file_name[:230]}-{hashlib.sha256(file_name.encode()).hexdigest()[:16]}"


def partial_name(image_name: str) -> str:
    """Where a snapshot is written before it becomes ``image_name`` in the store."""
    return bounded(f".{image_name}.partial")


def own_disk(source: str, folder: pathlib.Path) -> bool:
    """Whether a disk is one of the instance's own (root, ephemeral, swap, config drive), not an attached
    volume."""
    path = pathlib.PurePath(source)
    return path.parent == folder and not path.name.startswith(VOLUME)


def next_target(used: Collection[str], prefix: str = "vd") -> str:
    for letter in "abcdefghijklmnopqrstuvwxyz":
        if f"{prefix}{letter}" not in used:
            return f"{prefix}{letter}"
    raise DriverError("no free disk device name left")
