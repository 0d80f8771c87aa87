"""An instance's life on one host: spawn, redefinition, power, rescue, snapshot, destroy."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import time
from collections.abc import Callable

from kubenova.driver import cloudinit
from kubenova.driver.base import (
    ImageRef,
    InstanceNotFound,
    InstanceSpec,
    InvalidInstanceSpec,
    PowerState,
    RebootType,
    SnapshotResult,
    Unsupported,
    check_macs,
)
from kubenova.driver.libvirt import imagecache
from kubenova.driver.libvirt.config import GuestConfig
from kubenova.driver.libvirt.core import filter_name
from kubenova.driver.libvirt.definitions import rescue_definition
from kubenova.driver.libvirt.disks import (
    CONFIG_DRIVE,
    EPHEMERAL,
    RESCUE_DISK,
    ROOT,
    SWAP,
    UNRESCUE,
    own_disk,
    partial_name,
)
from kubenova.driver.libvirt.guest import Guest
from kubenova.driver.libvirt.guest_agent import GuestAgentAccess

log = logging.getLogger(__name__)


def changed_fields(running: GuestConfig, defined: GuestConfig, folder: pathlib.Path) -> list[str]:
    """The spec fields in which the definition for the next boot differs from what the domain runs with."""
    fields = []
    if running.vcpus != defined.vcpus:
        fields.append("spec.flavor.vcpus")
    if running.memory_mib != defined.memory_mib:
        fields.append("spec.flavor.memoryMiB")
    if running.cpu_model != defined.cpu_model:
        fields.append("spec.cpu.model")
    if (running.kernel, running.initrd, running.cmdline) != (defined.kernel, defined.initrd, defined.cmdline):
        fields.append("spec.boot.kernel")

    def own(config: GuestConfig) -> set[str]:
        return {pathlib.PurePath(d.source).name for d in config.disks if own_disk(d.source, folder)}

    for name in sorted((own(running) ^ own(defined)) - {CONFIG_DRIVE}):
        fields.append(
            "spec.rootDisk" if name == ROOT else "spec.swap" if name == SWAP else "spec.ephemeralDisks"
        )
    if CONFIG_DRIVE not in own(running) or running.drive:  # a drive made before drives had digests: unknown
        fields += [
            field
            for file, field in cloudinit.FIELDS.items()
            if running.drive.get(file) != defined.drive.get(file)
        ]

    def nics(config: GuestConfig) -> list[tuple[str, str, str | None, str]]:
        return [(i.name, i.network, i.mac, i.model) for i in config.interfaces]

    if nics(running) != nics(defined):
        fields.append("spec.interfaces")
    return list(dict.fromkeys(fields))


class Lifecycle(GuestAgentAccess):
    def spawn(self, instance: InstanceSpec, power_on: bool = True) -> None:
        self._create(instance, power_on)

    def redefine(self, instance: InstanceSpec) -> None:
        """Define the instance as the spec now says, for its next boot; disks grow at once (live when it
        runs).

        A running domain keeps what it was started with (libvirt's persistent definition is what the next
        start uses); pending_changes says what differs. In rescue, the saved original is updated, so
        unrescue boots the new definition.
        """
        guest = self._guest(instance.uuid)
        self._check_instance(instance)
        folder = self._dir(instance.uuid)
        saved = folder / UNRESCUE
        current = GuestConfig.parse_dom(saved.read_text() if saved.exists() else guest.config_xml())
        if instance.interfaces:
            check_macs(instance, self._macs_in_use(instance.uuid))
            self.plug_vifs(instance.uuid, instance.interfaces)
            if not self.host.has_nwfilter(
                filter_name(instance.uuid)
            ):  # the first interface: its filter, with no rules yet
                self.ensure_filtering_rules_for_instance(instance.uuid, instance.firewall)
        desired = self._guest_config(instance, folder, current)
        if desired.to_xml() != current.to_xml():
            if saved.exists():
                saved.write_text(desired.to_xml())
            else:
                self.host.define(desired.to_xml(), instance.uuid)
        self._grow_disks(guest, instance, folder)

    def _grow_disks(self, guest: Guest, instance: InstanceSpec, folder: pathlib.Path) -> None:
        """Grow the instance's disks to the spec's sizes (never shrink): libvirt resizes a running guest's
        disk live."""
        sizes = [(folder / f"{EPHEMERAL}{name}", gib * 2**30) for name, gib in instance.ephemeral_gib]
        if instance.root_gib:
            sizes.append((folder / ROOT, instance.root_gib * 2**30))
        if instance.swap_mib:
            sizes.append((folder / SWAP, instance.swap_mib * 2**20))
        live = {d.source for d in guest.devices().disks} if guest.active else set()
        for path, size in sizes:
            if not path.exists() or imagecache.virtual_size(path, force_share=True) >= size:
                continue
            if str(path) in live:
                guest.block_resize(str(path), size)
            else:
                imagecache.resize(path, str(size))

    def defined_revision(self, uuid: str) -> str:
        guest = self._guest(uuid)
        saved = self._dir(uuid) / UNRESCUE  # in rescue, the definition unrescue restores
        return GuestConfig.parse_dom(saved.read_text() if saved.exists() else guest.config_xml()).revision

    def pending_changes(self, uuid: str) -> list[str]:
        guest = self._guest(uuid)
        if not guest.active or (self._dir(uuid) / UNRESCUE).exists():
            return []
        return changed_fields(
            GuestConfig.parse_dom(guest.live_xml()),
            GuestConfig.parse_dom(guest.config_xml()),
            self._dir(uuid),
        )

    def destroy(self, uuid: str, destroy_disks: bool = True) -> None:
        try:
            guest = self._guest(uuid)
        except InstanceNotFound:
            guest = None
        if guest is not None:
            guest.remove()
        with self._lock:
            self._thaw_due.discard(uuid)  # a guest that is gone has nothing frozen
        self.unfilter_instance(uuid)
        if destroy_disks:
            shutil.rmtree(self._dir(uuid), ignore_errors=True)

    def reboot(self, uuid: str, reboot_type: RebootType, soft_timeout: float = 60.0) -> RebootType:
        guest = self._running(uuid, "reboot")
        with self._lock:
            self._rebooting[uuid] = time.monotonic()
        try:
            if reboot_type is RebootType.SOFT:
                guest.shutdown()
                deadline = time.monotonic() + soft_timeout
                while time.monotonic() < deadline:
                    if not guest.active:
                        guest.launch()
                        return RebootType.SOFT
                    time.sleep(0.2)
                log.info("%s ignored the ACPI shutdown for %.0fs; rebooting hard", uuid, soft_timeout)
            guest.poweroff("hard reboot")
            guest.launch("hard reboot")
            return RebootType.HARD
        finally:
            with self._lock:
                self._rebooting.pop(uuid, None)

    def power_off(self, uuid: str) -> None:
        guest = self._guest(uuid)
        if guest.active:
            guest.poweroff()
        else:
            guest.remove_saved_memory()  # stopped means stopped: drop the saved memory

    def power_on(self, uuid: str) -> None:
        guest = self._guest(uuid)
        state = guest.state()
        if state is PowerState.PAUSED:
            guest.resume("power on")
        elif not guest.active:
            guest.launch("power on")  # restores the managed save of a suspended instance

    def pause(self, uuid: str) -> None:
        guest = self._running(uuid, "pause")
        if guest.state() is not PowerState.PAUSED:
            guest.pause()

    def unpause(self, uuid: str) -> None:
        guest = self._guest(uuid)
        if guest.state() is PowerState.PAUSED:
            guest.resume()

    def suspend(self, uuid: str) -> None:
        self._running(uuid, "suspend").save_memory_state()

    def resume(self, uuid: str) -> None:
        """Restore the saved memory; an instance that is not suspended is left as it is."""
        guest = self._guest(uuid)
        if guest.state() is PowerState.SUSPENDED:
            guest.launch("resume")

    def rescue(self, uuid: str, rescue_image: ImageRef) -> None:
        guest = self._guest(uuid)
        folder = self._dir(uuid)
        if (folder / UNRESCUE).exists():
            return  # already in rescue
        original = guest.config_xml()
        base = self.cache.base(rescue_image, "spec.rescue.image")
        self.cache.overlay(base, folder / RESCUE_DISK)
        rescue = rescue_definition(original, str(folder / RESCUE_DISK))
        (folder / UNRESCUE).write_text(original)
        guest.poweroff("rescue")
        self.host.define(rescue, uuid).launch("rescue")

    def unrescue(self, uuid: str) -> None:
        guest = self._guest(uuid)
        folder = self._dir(uuid)
        if not (folder / UNRESCUE).exists():
            return
        guest.poweroff("unrescue")
        self.host.define((folder / UNRESCUE).read_text(), uuid).launch("unrescue")
        (folder / UNRESCUE).unlink()
        (folder / RESCUE_DISK).unlink(missing_ok=True)

    def snapshot(
        self, uuid: str, image: ImageRef, progress: Callable[[int], None] | None = None
    ) -> SnapshotResult:
        """Freeze (through the guest agent), pause, copy, resume, thaw: the guest's file systems are clean on
        the copy when its agent answers; a guest without one is paused during the copy all the same, so the
        copy is at least what a power loss would leave."""
        guest = self._guest(uuid)
        root = self._dir(uuid) / ROOT
        if not root.exists():
            raise Unsupported(
                "snapshot", "the instance has no root disk (direct kernel boot without spec.rootDisk)"
            )
        field = "spec.actions.snapshot.imageName"
        if self.images.taken(field, image):
            raise InvalidInstanceSpec(field, f"image {image.name!r} already exists in the image store")
        own = self.images.snapshots(image.namespace)
        own.root.mkdir(parents=True, exist_ok=True)
        dest = own.path(field, image.name)
        tmp = dest.with_name(partial_name(image.name))
        tmp.unlink(
            missing_ok=True
        )  # an interrupted snapshot's, or a link someone left: never written through
        state = guest.state()
        with self._quiesced(uuid, guest, state) as (consistent, reason):
            paused = state is PowerState.RUNNING
            if paused:  # no guest writes while the copy is made; the agent cannot answer from here on
                guest.pause("pause for snapshot")
            try:
                imagecache.convert(root, tmp, progress)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
                if paused:
                    guest.resume("resume after snapshot")
        if progress:
            progress(100)
        return SnapshotResult(image.name, consistent, reason)

    def poll_rebooting_instances(self, timeout: float) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return [uuid for uuid, started in self._rebooting.items() if now - started > timeout]

    def poll_rescued_instances(self, timeout: float) -> list[str]:
        now = time.time()
        return [
            marker.parent.name
            for marker in self.instances_dir.glob(f"*/{UNRESCUE}")
            if now - marker.stat().st_mtime > timeout
        ]
