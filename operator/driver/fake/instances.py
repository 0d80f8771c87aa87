"""How the fake host makes, admits, boots and releases an instance: what the verbs of every layer use."""

from __future__ import annotations

import heapq
import posixpath
from collections.abc import Mapping

from kubenova.driver import cloudinit
from kubenova.driver.base import (
    ImageNotFound,
    InstanceSpec,
    PowerState,
    check_cpu_model,
    check_instance,
    check_macs,
)
from kubenova.driver.fake.disks import (
    CONFIG_DRIVE,
    GIB,
    MIB,
    ROOT,
    SECTOR,
    SWAP,
    Device,
    Disk,
    bases_of,
    iso_size,
    store_volume_name,
)
from kubenova.driver.fake.guest import boot_lines, parse_write_hook
from kubenova.driver.fake.host import FakeHost
from kubenova.driver.fake.instance import Instance, disk_layout


class FakeInstances(FakeHost):
    """Making and running instances (callers hold the lock)."""

    def _validate(self, spec: InstanceSpec, folder: Mapping[str, Disk]) -> None:
        """Everything spawn can refuse, checked before anything is made, so a failure leaves nothing."""
        self._check_name_free(spec)
        check_instance(spec, self.memory_mib)
        check_cpu_model(spec, self.cpu_models)
        if spec.interfaces:
            check_macs(
                spec,
                {
                    mac.lower(): f"{i.spec.namespace}/{i.spec.name}"
                    for i in self._instances.values()
                    if i.spec.uuid != spec.uuid
                    for mac in i.spec.macs()
                },
            )
        if spec.boot is not None:
            for field, path in (
                ("spec.boot.kernel.image", spec.boot.kernel),
                ("spec.boot.kernel.initrd", spec.boot.initrd),
            ):
                if path is not None and posixpath.basename(path) not in self._images:
                    raise ImageNotFound(
                        field,
                        f"{posixpath.basename(path)!r} is not in the image store of "
                        f"{self.hostname}; copy it there or fix the name",
                    )
        if spec.image is not None and ROOT not in folder:
            self._checked_image(spec.image, "spec.boot.image.name")

    def _create(self, spec: InstanceSpec, folder: Mapping[str, Disk], now: float) -> Instance:
        """A stopped instance whose disks are the folder's (kept or migrated) where it has them, else new."""
        files = dict(folder)
        local: dict[str, Device] = {}

        def boot_disk(name: str, size: int) -> None:
            disk = files.setdefault(name, Disk(0, cow=True))
            disk.size = max(disk.size, size)  # grown to the flavor, never shrunk
            local[name] = Device(disk)

        if spec.image is not None and ROOT not in files:
            files[ROOT] = self._overlay(spec.image, "spec.boot.image.name", now)
        if spec.image is not None or spec.root_gib:
            boot_disk(ROOT, (spec.root_gib or 0) * GIB)
        for name, gib in spec.ephemeral_gib:
            boot_disk(f"disk.eph.{name}", gib * GIB)
        if spec.swap_mib:
            boot_disk(SWAP, spec.swap_mib * MIB)
        if cloudinit.needed(spec):
            files[CONFIG_DRIVE] = Disk(iso_size(cloudinit.files(spec)))
            local[CONFIG_DRIVE] = Device(files[CONFIG_DRIVE], read_only=True)
        self._touch(bases_of(files.values()), now)
        return Instance(
            spec=spec,
            state=PowerState.SHUTOFF,
            files=files,
            local=local,
            write_hook=parse_write_hook(spec.boot),
        )

    def _admit(self, inst: Instance) -> None:
        """Make the instance one of this host's: its name, a VNC display and its volumes' locks."""
        uuid = inst.spec.uuid
        self._instances[uuid] = inst
        self._names[(inst.spec.namespace, inst.spec.name)] = uuid
        if self._free_vnc:
            inst.vnc_index = heapq.heappop(self._free_vnc)
        else:
            inst.vnc_index, self._next_vnc = self._next_vnc, self._next_vnc + 1
        for device, attached in inst.volumes.items():
            name = store_volume_name(attached)
            if name is not None:
                self._volume_holders[name] = (uuid, device)

    def _release(self, inst: Instance, now: float) -> None:
        uuid = inst.spec.uuid
        del self._instances[uuid]
        del self._names[(inst.spec.namespace, inst.spec.name)]
        heapq.heappush(self._free_vnc, inst.vnc_index)
        for attached in inst.volumes.values():
            name = store_volume_name(attached)
            if name is not None:
                del self._volume_holders[name]
        # the image cache's grace period counts from the last moment an instance used a base
        self._touch(bases_of(inst.files.values()), now)

    def _apply_definition(self, inst: Instance, now: float) -> None:
        """The definition redefine left for the next boot becomes the instance's (its disks as _create makes
        them)."""
        if inst.defined is None:
            return
        fresh = self._create(inst.defined, inst.files, now)
        inst.spec, inst.files, inst.local = fresh.spec, fresh.files, fresh.local
        inst.write_hook, inst.defined = fresh.write_hook, None

    def _boot(self, inst: Instance, now: float) -> None:
        """A fresh boot: whatever ran (or was saved) is gone; the guest prints its boot lines."""
        self._apply_definition(inst, now)
        inst.state, inst.io_error = PowerState.RUNNING, False
        if inst.agent is not None:  # a fresh kernel: nothing of the last boot is frozen
            inst.agent.frozen = False
        layout = disk_layout(inst)
        for _, device in layout:  # the guest reads each disk's first sector to print its head
            device.counters.rd_req += 1
            device.counters.rd_bytes += SECTOR
        disks = [(name, device.disk.sectors, device.disk.head()) for name, device in layout]
        drive = cloudinit.files(inst.spec) if CONFIG_DRIVE in inst.files else {}
        inst.guest.mac = inst.spec.macs()[0] if inst.spec.interfaces else None
        inst.guest.boot(now, boot_lines(inst.rescue is not None, disks, drive, bool(inst.spec.interfaces)))
        self._guest_writes(inst, now)

    def _continue(self, inst: Instance, now: float) -> None:
        """Unpause or restore: the same boot runs on, so the tick count goes on where it stopped.

        A guest stopped on a failed write retries it first: with the disk still full it stops again.
        """
        if inst.io_error and self._disk_full:
            inst.state = PowerState.PAUSED
            return
        inst.state, inst.io_error = PowerState.RUNNING, False
        inst.guest.run(now)
        self._guest_writes(inst, now)

    def _power_on(self, inst: Instance, now: float) -> None:
        if inst.state in (PowerState.PAUSED, PowerState.SUSPENDED):
            self._continue(inst, now)
        elif inst.state is not PowerState.RUNNING:
            self._boot(inst, now)

    def _guest_writes(self, inst: Instance, now: float) -> None:
        """The write hook: a running guest tries once per boot, as soon as the device is there.

        The rescue image boots with its own command line, so rescue never writes. A read-only
        device uses up the try without a line, as the real guest's failing dd does.
        """
        if (
            inst.write_hook is None
            or inst.guest.wrote
            or inst.state is not PowerState.RUNNING
            or inst.rescue is not None
        ):
            return
        name, pattern = inst.write_hook
        device = dict(disk_layout(inst)).get(name)
        if device is None:
            return
        inst.guest.wrote = True
        if device.read_only:
            return
        payload = pattern.encode()
        device.disk.write(payload)
        device.counters.wr_req += 1
        device.counters.wr_bytes += len(payload)
        inst.guest.report_write(now, name, pattern)
