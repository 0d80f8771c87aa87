"""The fake host's volumes: store volumes and image overlays, attached and detached."""

from __future__ import annotations

from kubenova.driver.base import DriverError, ImageRef, InvalidInstanceSpec, VolumeNotFound, VolumeSpec
from kubenova.driver.fake.disks import (
    GIB,
    Device,
    Disk,
    bases_of,
    free_device,
    plain_name,
    store_volume_name,
    volume_key,
)
from kubenova.driver.fake.instance import device_names
from kubenova.driver.fake.instances import FakeInstances


class FakeVolumes(FakeInstances):
    """The contract's volume verbs."""

    def attach_volume(self, uuid: str, volume: VolumeSpec, device: str) -> str:
        """An empty ``device`` takes the first free name on the bus, as the libvirt driver does.

        An image is attached through an overlay in the instance folder, kept after detach, so
        attaching the same image again shows what the guest wrote to it.
        """
        with self._lock:
            now = self._clock()
            inst = self._get(uuid)
            for name, attached in inst.volumes.items():
                if attached.source == volume and device in ("", name):
                    return name  # a retry of the same attachment
            in_use = device_names(inst)
            device = device or free_device(in_use, "vd" if volume.bus == "virtio" else "sd")
            if device in in_use:
                raise InvalidInstanceSpec(
                    "spec.device.name", f"{device} is already in use on instance {uuid}"
                )
            if volume.from_image:
                overlay = self._overlay(
                    ImageRef(volume.name, namespace=volume.namespace), "spec.image.name", now
                )
                disk = inst.files.setdefault(f"disk.vol.{volume.name}", overlay)
            else:
                disk = self._store_volume(volume)
                self._volume_holders[volume_key(volume)] = (uuid, device)
            inst.volumes[device] = Device(disk, read_only=volume.read_only, source=volume)
            self._guest_writes(inst, now)
            return device

    def store_volume_size(self, volume: VolumeSpec) -> int:
        if volume.from_image:
            return 0
        with self._lock:
            disk = self._volumes.get(volume_key(volume))
        if disk is None:
            raise VolumeNotFound(f"volume {volume.name!r} is not in this host's store")
        return disk.size

    def drop_volume_copies(self, uuid: str) -> None:
        """Nothing to drop: the fake's volumes move in one step, when a migration succeeds (``_arrive``)."""

    def detach_volume(self, uuid: str, device: str) -> None:
        with self._lock:
            inst = self._get(uuid)
            attached = inst.volumes.pop(device, None)
            if attached is None:
                raise VolumeNotFound(f"no volume is attached at {device} on instance {uuid}")
            name = store_volume_name(attached)
            if name is not None:
                del self._volume_holders[name]
            self._touch(bases_of([attached.disk]), self._clock())

    def _store_volume(self, volume: VolumeSpec) -> Disk:
        plain_name("spec.volume.name", volume.name)
        plain_name("metadata.namespace", volume.namespace)
        key = volume_key(volume)
        if volume.path and key not in self._volumes:  # the claim's file exists on a real node
            self._volumes[key] = Disk(GIB, bytearray())
        holder = self._volume_holders.get(key)
        if holder is not None:
            raise DriverError(
                f"volume {volume.name!r} is attached to instance {holder[0]} at {holder[1]}; "
                "detach it there first"
            )
        disk = self._volumes.get(key)
        if disk is None:
            if not volume.size_gib:
                raise InvalidInstanceSpec(
                    "spec.volume.sizeGiB", f"volume {volume.name!r} does not exist; give a size to create it"
                )
            disk = self._volumes[key] = Disk(volume.size_gib * GIB, bytearray())
        return disk
