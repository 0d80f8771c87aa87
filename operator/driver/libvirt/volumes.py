"""Volumes: a raw file in the volume store (or a copy-on-write overlay of an image), or a claim's file or
block device where the kubelet has it, hot-plugged as a disk."""

from __future__ import annotations

import os
import pathlib
import stat
import time

from kubenova.driver.base import DriverError, InvalidInstanceSpec, MovingVolume, VolumeNotFound, VolumeSpec
from kubenova.driver.libvirt.core import LibvirtCore
from kubenova.driver.libvirt.disks import next_target


def device_size(device: int) -> int:
    """A block device's size (a Block-mode claim's), from sysfs: opening the device itself needs a right the
    agent's container does not have. 0 when sysfs does not say."""
    try:
        sectors = pathlib.Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/size").read_text()
    except OSError:
        return 0
    return int(sectors) * 512


class Volumes(LibvirtCore):
    def attach_volume(self, uuid: str, volume: VolumeSpec, device: str) -> str:
        guest = self._guest(uuid)
        used = [d.target for d in guest.devices().disks]
        if volume.from_image:
            path = self._image_volume(uuid, volume)
        elif volume.path:
            path, _ = self._volume_file(uuid, volume)
            if not path.exists():
                raise VolumeNotFound(f"claim {volume.name!r} is not at {path}")
        else:
            path = self._store_file(volume)
            if not path.exists():
                if not volume.size_gib:
                    raise InvalidInstanceSpec(
                        "spec.volume.sizeGiB",
                        f"volume {volume.name!r} does not exist; give a size to create it",
                    )
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "xb") as f:
                    f.truncate(volume.size_gib * 2**30)
        disks = guest.devices().disks
        for existing in disks:
            if existing.source == str(path) and device in ("", existing.target):
                return existing.target  # already attached: a retry (the agent may have died before saying so)
        target = device or next_target(used, "vd" if volume.bus == "virtio" else "sd")
        if target in used:
            existing = next(d for d in disks if d.target == target)
            raise InvalidInstanceSpec("spec.device.name", f"{target} is already used by {existing.source}")
        guest.attach_disk(self._volume_disk(uuid, MovingVolume(volume, target)))
        return target

    def store_volume_size(self, volume: VolumeSpec) -> int:
        if volume.from_image:
            return 0
        try:
            path = pathlib.Path(volume.path) if volume.path else self._store_file(volume)  # a claim's disk
            found = path.stat()
            return device_size(found.st_rdev) if stat.S_ISBLK(found.st_mode) else found.st_size
        except FileNotFoundError as exc:
            raise VolumeNotFound(f"volume {volume.name!r} is not in this node's store") from exc

    def detach_volume(self, uuid: str, device: str, timeout: float = 30.0) -> None:
        """Drop the disk from the persistent definition, then ask the running guest to release it.

        A guest may miss the unplug request (it was still booting, say), so the live request is
        repeated every few seconds until the disk is gone, like Nova's detach with retries; a
        retry after a partial detach (gone from one side only) finishes the other side.
        """
        guest = self._guest(uuid)
        config = guest.config_devices()
        live = guest.devices() if guest.active else None
        disk = next((d for d in [*config.disks, *(live.disks if live else [])] if d.target == device), None)
        if disk is None:
            raise VolumeNotFound(f"no volume is attached at {device}")
        if any(d.target == device for d in config.disks):
            guest.detach_disk_config(disk)
        deadline = time.monotonic() + timeout
        while guest.active and any(d.target == device for d in guest.devices().disks):
            if time.monotonic() > deadline:
                raise DriverError(
                    f"the guest did not release {device} within {timeout:.0f}s; it is removed from "
                    "the definition, so it is gone after the next power off at the latest"
                )
            guest.detach_disk_live(disk)
            end = min(deadline, time.monotonic() + 5)  # the guest acknowledges a hot unplug in its own time
            while time.monotonic() < end and any(d.target == device for d in guest.devices().disks):
                time.sleep(0.2)
