"""One instance of the fake host: its definition, power state, folder, devices and guest."""

from __future__ import annotations

import dataclasses

from kubenova.driver import cloudinit
from kubenova.driver.base import GuestAgentInfo, InstanceSpec, PowerState
from kubenova.driver.fake.disks import ROOT, SWAP, Device, Disk, boot_disk_names
from kubenova.driver.fake.guest import Guest

#: The states in which an instance has a process: it holds memory, taps, a VNC server and counters.
ACTIVE = (PowerState.RUNNING, PowerState.PAUSED)


@dataclasses.dataclass
class GuestAgent:
    """A QEMU guest agent in the fake guest, as a test installs it (the real test guest runs none): connected
    while the guest runs, across its boots and live migrations."""

    #: what it says of the guest; None: a plain Linux guest named after the instance, with its interfaces
    info: GuestAgentInfo | None = None
    #: connected, but it never answers (each call ends in the driver's timeout)
    hung: bool = False
    #: it answers, but refuses to freeze (a guest whose fsfreeze hook fails)
    refuses_freeze: bool = False
    frozen: bool = False
    #: how often it froze the guest's file systems, and the passwords it set, by user
    freezes: int = 0
    passwords: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Instance:
    """An instance defined on the fake host: what runs (``spec``), its state, files, devices and guest."""

    spec: InstanceSpec
    #: SUSPENDED is the managed save: no process, the memory kept on disk
    state: PowerState
    #: the instance's folder: its disk files by name
    files: dict[str, Disk]
    #: the boot disks (root, ephemeral, swap, config drive) in guest order, by file name
    local: dict[str, Device]
    #: (device, pattern) of the kernel command line's write hook
    write_hook: tuple[str, str] | None
    guest: Guest = dataclasses.field(default_factory=Guest)
    #: attached volumes by guest device
    volumes: dict[str, Device] = dataclasses.field(default_factory=dict)
    vnc_index: int = 0
    rescue: Device | None = None
    rescued_since: float | None = None
    rebooting_since: float | None = None
    #: the definition redefine made for the next boot, while the running one is still ``spec``
    defined: InstanceSpec | None = None
    #: paused because a disk write failed (see FakeHost.fill_instances_disk)
    io_error: bool = False
    #: the guest's QEMU guest agent, when a test installed one (install_guest_agent)
    agent: GuestAgent | None = None


def device_names(inst: Instance) -> set[str]:
    """The guest devices in the instance's own definition (not its rescue one)."""
    return set(boot_disk_names(len(inst.local), inst.volumes)) | set(inst.volumes)


def disk_layout(inst: Instance) -> list[tuple[str, Device]]:
    """What the guest sees now; rescue puts its disk at vda and moves every other one a letter on."""
    named = list(
        zip(boot_disk_names(len(inst.local), inst.volumes), inst.local.values(), strict=True)
    ) + sorted(inst.volumes.items())
    if inst.rescue is None:
        return named
    return [("vda", inst.rescue)] + [(name[:-1] + chr(ord(name[-1]) + 1), device) for name, device in named]


def tap_names(inst: Instance) -> list[str]:
    """Host-side names exist while the domain runs, as libvirt's taps do."""
    if inst.state not in ACTIVE:
        return []
    return [f"tap{inst.spec.uuid[:8]}-{i}" for i in range(len(inst.spec.interfaces))]


def changed_fields(running: InstanceSpec, defined: InstanceSpec) -> list[str]:
    """The spec fields in which ``defined`` differs from what runs, in the libvirt driver's terms and
    order."""
    fields = []
    if running.vcpus != defined.vcpus:
        fields.append("spec.flavor.vcpus")
    if running.memory_mib != defined.memory_mib:
        fields.append("spec.flavor.memoryMiB")
    if running.cpu_model != defined.cpu_model:
        fields.append("spec.cpu.model")
    if running.boot != defined.boot:
        fields.append("spec.boot.kernel")

    def disks(spec: InstanceSpec) -> set[str]:
        names = {f"disk.eph.{name}" for name, _ in spec.ephemeral_gib}
        return (
            names
            | ({ROOT} if spec.image is not None or spec.root_gib else set())
            | ({SWAP} if spec.swap_mib else set())
        )

    for name in sorted(disks(running) ^ disks(defined)):
        fields.append(
            "spec.rootDisk" if name == ROOT else "spec.swap" if name == SWAP else "spec.ephemeralDisks"
        )

    def drive(spec: InstanceSpec) -> dict[str, bytes]:
        return cloudinit.files(spec) if cloudinit.needed(spec) else {}

    before, after = drive(running), drive(defined)
    fields += [field for file, field in cloudinit.FIELDS.items() if before.get(file) != after.get(file)]

    def nics(spec: InstanceSpec) -> list[tuple[str, str, str, str]]:
        return [
            (i.name, i.network, mac, i.model) for i, mac in zip(spec.interfaces, spec.macs(), strict=True)
        ]

    if nics(running) != nics(defined):
        fields.append("spec.interfaces")
    return fields
