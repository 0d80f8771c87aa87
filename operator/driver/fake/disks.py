"""The fake host's storage model: disk files, the devices a guest sees them as, and their names.

Every file is named as the libvirt driver names it in the instance folder. A disk is sparse (its
virtual size and the bytes at its start); a copy-on-write one holds only what the guest wrote.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping

from kubenova.driver.base import BlockStats, ImageRef, InvalidInstanceSpec, VolumeSpec

# The instance folder's files, named as the libvirt driver names them.
ROOT, SWAP, CONFIG_DRIVE, RESCUE_DISK = "disk", "disk.swap", "disk.config", "disk.rescue"
CONSOLE_LOG, UNRESCUE = "console.log", "unrescue.xml"

MIB, GIB = 2**20, 2**30
SECTOR = 512
HEAD_BYTES = 16
#: What pycdlib's ISO9660 metadata takes for a handful of files, and its block size (measured),
#: so the config drive has the size the real one has.
ISO_OVERHEAD, ISO_BLOCK = 64 * 1024, 2048


@dataclasses.dataclass(frozen=True)
class Image:
    data: bytes
    #: computed once, so a thousand spawns checking a checksum hash nothing
    sha256: str


@dataclasses.dataclass
class Disk:
    """A sparse disk: its virtual size and the bytes at its start (the rest reads as zeros).

    ``data`` starts as the base image's own ``bytes`` object, shared by every disk made from
    it, and becomes a private bytearray on the first write: copy-on-write, as with qcow2.
    """

    size: int
    data: bytes | bytearray = b""
    #: sha256 of the cached base behind it, which the image cache must therefore keep
    base: str | None = None
    #: a copy-on-write file (qcow2, as the libvirt driver makes the root, ephemeral, swap and overlay disks):
    #: it holds only what the guest wrote and may grow to ``size``; any other file (config drive, store
    #: volume) takes its whole size
    cow: bool = False
    #: how far into a copy-on-write disk the guest has written, the bytes its file holds
    written: int = 0

    @property
    def allocated(self) -> int:
        """The bytes the file takes on the host's disk now."""
        return self.written if self.cow else self.size

    @property
    def sectors(self) -> int:
        return (self.size + SECTOR - 1) // SECTOR

    def head(self) -> str:
        return bytes(self.data[:HEAD_BYTES]).ljust(HEAD_BYTES, b"\0").hex()

    def write(self, payload: bytes) -> None:
        """Write at offset 0, as the guest's write hook does; a disk never grows past its size."""
        payload = payload[: self.size]
        if not isinstance(self.data, bytearray):
            self.data = bytearray(self.data)
        if len(self.data) < len(payload):
            self.data.extend(bytes(len(payload) - len(self.data)))
        self.data[: len(payload)] = payload
        self.written = max(self.written, len(payload))

    def copy(self) -> Disk:
        return Disk(self.size, bytes(self.data), self.base, self.cow, self.written)


@dataclasses.dataclass
class BlockCounters:
    rd_req: int = 0
    rd_bytes: int = 0
    wr_req: int = 0
    wr_bytes: int = 0
    errs: int = 0


@dataclasses.dataclass
class Device:
    """A disk as one instance sees it; libvirt keeps counters per device, not per file."""

    disk: Disk
    read_only: bool = False
    #: what attach_volume was asked for; None for the instance's own disks
    source: VolumeSpec | None = None
    counters: BlockCounters = dataclasses.field(default_factory=BlockCounters)


def plain_name(field: str, name: str) -> None:
    """Store names are file names on the real node; the fake refuses what the real one would."""
    if not name or "/" in name or name in (".", ".."):
        raise InvalidInstanceSpec(field, f"{name!r} is not a plain file name")


def iso_size(files: Mapping[str, bytes]) -> int:
    return ISO_OVERHEAD + sum((len(data) + ISO_BLOCK - 1) // ISO_BLOCK * ISO_BLOCK for data in files.values())


def boot_disk_names(count: int, taken: Collection[str] = ()) -> list[str]:
    """vda, vdb, … in order, around the names attached volumes hold (as the libvirt driver names them)."""
    return [name for name in (f"vd{chr(ord('a') + i)}" for i in range(26)) if name not in taken][:count]


def imported_key(digest: str) -> str:
    """Where an image imported by url or from a registry lives in the fake's image store."""
    return f"imported/{digest}"


def snapshot_key(image: ImageRef) -> str:
    """Where a namespace's own snapshot lives in the fake's image store (the public tier: its name)."""
    return f"snapshots/{image.namespace}/{image.name}"


def store_key(namespace: str, name: str) -> str:
    """Where a store volume lives: its namespace's folder of the store."""
    return f"{namespace}/{name}"


def volume_key(volume: VolumeSpec) -> str:
    """A store volume's store_key; a claim's volume is known by its path on the node, as the libvirt
    driver knows it (a path starts with /, a store key never does)."""
    return volume.path or store_key(volume.namespace, volume.name)


def store_volume_name(device: Device) -> str | None:
    """The volume store entry behind a device; None for the instance's own disks and image overlays."""
    source = device.source
    return volume_key(source) if source is not None and not source.from_image else None


def block_stats_of(counters: BlockCounters) -> BlockStats:
    return BlockStats(**dataclasses.asdict(counters))


def bases_of(files: Iterable[Disk]) -> set[str]:
    return {disk.base for disk in files if disk.base is not None}


def free_device(in_use: Collection[str], prefix: str) -> str:
    """The first ``<prefix><letter>`` no device holds, as the libvirt driver picks it."""
    for letter in "abcdefghijklmnopqrstuvwxyz":
        if prefix + letter not in in_use:
            return prefix + letter
    raise InvalidInstanceSpec("spec.device.name", f"no {prefix}* device name is free")
