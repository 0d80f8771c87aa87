"""The compute contract in memory: the libvirt driver's semantics without a hypervisor.

Two users shape it. Scale benchmarks run a thousand instances across twenty agents on two
cores, so an instance is a few small objects, with no thread, timer or sleep of its own.
Handler and conformance tests need to see what a guest would see, so a simulated guest
prints the same console lines as the real test guest (testground/guest.py), the instance
folder, config drive and image cache follow the libvirt driver's, and every time-dependent
behaviour reads an injectable clock, so tests move time instead of waiting.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import heapq
import math
import posixpath
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import ClassVar

from kubenova.driver import cloudinit
from kubenova.driver.base import (
    BlockStats,
    ComputeDriver,
    CPUIncompatible,
    CpuInfo,
    Diagnostics,
    DriverError,
    FirewallRule,
    HostPowerAction,
    HostStats,
    ImageChecksumMismatch,
    ImageNotFound,
    ImageRef,
    InstanceDetail,
    InstanceExists,
    InstanceInfo,
    InstanceNotFound,
    InstanceNotRunning,
    InstanceSpec,
    Interface,
    InterfaceDetail,
    InterfaceStats,
    InvalidCPUInfo,
    InvalidInstanceSpec,
    KernelBoot,
    MigrationOutcome,
    MigrationProgress,
    PowerState,
    ProgressCallback,
    RebootType,
    Unsupported,
    VncConsole,
    VolumeConnector,
    VolumeNotFound,
    VolumeSpec,
    check_instance,
    check_macs,
)

# The console lines of the real test guest (testground/guest.py), so one conformance test
# reads both drivers.
BOOT_MARKER = "KUBENOVA-GUEST-BOOTED"
RESCUE_MARKER = "KUBENOVA-RESCUE-BOOTED"
TICK = "kubenova-guest-tick"
DISK_LINE = "kubenova-disk"
CD_FILE_LINE = "kubenova-cd-file"
NET_LINE = "kubenova-net"
#: The guest prints its eth0's MAC before tick 0 and every MAC_EVERY ticks after it.
MAC_LINE, MAC_EVERY = "kubenova-mac", 10
WROTE_LINE = "kubenova-wrote"
#: ``kubenova.write=<dev>:<pattern>`` on the kernel command line: once per boot the guest
#: writes <pattern> at the start of the disk that is (or appears) at <dev>, so tests see
#: guest writes land. Like the real guest, only the last such argument counts, and a
#: malformed one switches the hook off.
WRITE_HOOK = "kubenova.write="
_HOOK_DEVICE = re.compile(r"[a-z0-9]+")
_HOOK_PATTERN = re.compile(r"[A-Za-z0-9-]+")

# The instance folder's files, named as the libvirt driver names them.
ROOT, SWAP, CONFIG_DRIVE, RESCUE_DISK = "disk", "disk.swap", "disk.config", "disk.rescue"
CONSOLE_LOG, UNRESCUE = "console.log", "unrescue.xml"

MIB, GIB = 2**20, 2**30
SECTOR = 512
HEAD_BYTES = 16
#: What pycdlib's ISO9660 metadata takes for a handful of files, and its block size (measured),
#: so the config drive has the size the real one has.
ISO_OVERHEAD, ISO_BLOCK = 64 * 1024, 2048

# The simulated guest's I/O, so counters move the way a real guest's do: at every boot it reads
# the first sector of each disk and makes one DHCP exchange per interface; every second it runs
# it sends and receives one minimal Ethernet frame per interface.
DHCP_BYTES = 342
FRAME_BYTES = 64
#: The test guest sleeps nearly all the time.
CPU_SHARE = 0.01
#: How often the real driver looks whether a soft-rebooted guest has gone down.
SOFT_REBOOT_POLL = 1.0
LIVE_MIGRATION_ITERATIONS = 3
EXPECTED_DOWNTIME_MS = 30
VNC_HOST, VNC_BASE_PORT = "127.0.0.1", 5900

DEFAULT_CPU_FEATURES = (
    "fpu",
    "sse",
    "sse2",
    "sse3",
    "ssse3",
    "sse4.1",
    "sse4.2",
    "popcnt",
    "aes",
    "avx",
    "avx2",
)

_ACTIVE = (PowerState.RUNNING, PowerState.PAUSED)


@dataclasses.dataclass(frozen=True)
class _Image:
    data: bytes
    #: computed once, so a thousand spawns checking a checksum hash nothing
    sha256: str


@dataclasses.dataclass
class _Disk:
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

    def copy(self) -> _Disk:
        return _Disk(self.size, bytes(self.data), self.base, self.cow, self.written)


@dataclasses.dataclass
class _BlockCounters:
    rd_req: int = 0
    rd_bytes: int = 0
    wr_req: int = 0
    wr_bytes: int = 0
    errs: int = 0


@dataclasses.dataclass
class _Device:
    """A disk as one instance sees it; libvirt keeps counters per device, not per file."""

    disk: _Disk
    read_only: bool = False
    #: what attach_volume was asked for; None for the instance's own disks
    source: VolumeSpec | None = None
    counters: _BlockCounters = dataclasses.field(default_factory=_BlockCounters)


@dataclasses.dataclass
class _Ticks:
    """A run of tick lines kept as two numbers, so a guest running for days costs no memory."""

    first: int
    stop: int
    #: the MAC the guest prints every MAC_EVERY ticks, when it has an eth0
    mac: str | None = None

    def render(self) -> str:
        return "".join(
            (f"{MAC_LINE} eth0 {self.mac}\n" if self.mac and n % MAC_EVERY == 0 else "") + f"{TICK} {n}\n"
            for n in range(self.first, self.stop)
        )


@dataclasses.dataclass
class _Guest:
    """The simulated guest: its serial console and how long it has run.

    No timer prints the ticks: they are derived from the clock when the console is read, or
    when a new line has to go after them. That is what keeps a thousand guests free.
    """

    console: list[str | _Ticks] = dataclasses.field(default_factory=list)
    boots: int = 0
    #: running seconds of this boot before ``running_since``
    ran: float = 0.0
    running_since: float | None = None
    #: ticks of this boot already on the console
    ticks: int = 0
    #: running seconds of all earlier boots; the network counters keep growing across boots
    ran_before: float = 0.0
    #: whether the write hook has fired in this boot (the guest tries once per boot)
    wrote: bool = False
    #: the MAC of the guest's eth0, None without interfaces
    mac: str | None = None

    def seconds(self, now: float) -> float:
        return self.ran + (now - self.running_since if self.running_since is not None else 0.0)

    def lifetime_seconds(self, now: float) -> float:
        return self.ran_before + self.seconds(now)

    def flush(self, due: int) -> None:
        """Put ticks up to (not including) ``due`` on the console."""
        if not self.boots or due <= self.ticks:
            return
        last = self.console[-1] if self.console else None
        if isinstance(last, _Ticks) and last.stop == self.ticks and last.mac == self.mac:
            last.stop = due
        else:
            self.console.append(_Ticks(self.ticks, due, self.mac))
        self.ticks = due

    def print(self, now: float, line: str) -> None:
        """The guest prints tick N at second N and acts between ticks: a line goes before the next tick."""
        self.flush(math.ceil(self.seconds(now)))
        self.console.append(line + "\n")

    def boot(self, now: float, lines: Iterable[str]) -> None:
        self.stop(now)
        self.ran_before += self.ran
        self.ran, self.ticks = 0.0, 0
        self.boots += 1
        self.wrote = False
        self.console.append("".join(line + "\n" for line in lines))
        self.running_since = now

    def stop(self, now: float) -> None:
        if self.running_since is None:
            return
        self.flush(math.floor(self.seconds(now)) + 1)
        self.ran += now - self.running_since
        self.running_since = None

    def run(self, now: float) -> None:
        if self.running_since is None:
            self.running_since = now

    def render(self, now: float) -> str:
        self.flush(math.floor(self.seconds(now)) + 1)
        return "".join(part if isinstance(part, str) else part.render() for part in self.console)


@dataclasses.dataclass
class _Instance:
    spec: InstanceSpec
    #: SUSPENDED is the managed save: no process, the memory kept on disk
    state: PowerState
    #: the instance's folder: its disk files by name
    files: dict[str, _Disk]
    #: the boot disks (root, ephemeral, swap, config drive) in guest order, by file name
    local: dict[str, _Device]
    #: (device, pattern) of the kernel command line's write hook
    write_hook: tuple[str, str] | None
    guest: _Guest = dataclasses.field(default_factory=_Guest)
    #: attached volumes by guest device
    volumes: dict[str, _Device] = dataclasses.field(default_factory=dict)
    vnc_index: int = 0
    rescue: _Device | None = None
    rescued_since: float | None = None
    rebooting_since: float | None = None
    #: the definition redefine made for the next boot, while the running one is still ``spec``
    defined: InstanceSpec | None = None


def _plain_name(field: str, name: str) -> None:
    """Store names are file names on the real node; the fake refuses what the real one would."""
    if not name or "/" in name or name in (".", ".."):
        raise InvalidInstanceSpec(field, f"{name!r} is not a plain file name")


def _write_hook(boot: KernelBoot | None) -> tuple[str, str] | None:
    hooks = [
        arg.removeprefix(WRITE_HOOK).partition(":")
        for arg in (boot.cmdline.split() if boot else ())
        if arg.startswith(WRITE_HOOK) and ":" in arg
    ]
    if not hooks:
        return None
    device, _, pattern = hooks[-1]
    if not _HOOK_DEVICE.fullmatch(device) or not _HOOK_PATTERN.fullmatch(pattern):
        return None
    return device, pattern


def _iso_size(files: Mapping[str, bytes]) -> int:
    return ISO_OVERHEAD + sum((len(data) + ISO_BLOCK - 1) // ISO_BLOCK * ISO_BLOCK for data in files.values())


def _boot_disk_names(count: int, taken: Collection[str] = ()) -> list[str]:
    """vda, vdb, … in order, around the names attached volumes hold (as the libvirt driver names them)."""
    return [name for name in (f"vd{chr(ord('a') + i)}" for i in range(26)) if name not in taken][:count]


def _device_names(inst: _Instance) -> set[str]:
    """The guest devices in the instance's own definition (not its rescue one)."""
    return set(_boot_disk_names(len(inst.local), inst.volumes)) | set(inst.volumes)


def _layout(inst: _Instance) -> list[tuple[str, _Device]]:
    """What the guest sees now; rescue puts its disk at vda and moves every other one a letter on."""
    named = list(
        zip(_boot_disk_names(len(inst.local), inst.volumes), inst.local.values(), strict=True)
    ) + sorted(inst.volumes.items())
    if inst.rescue is None:
        return named
    return [("vda", inst.rescue)] + [(name[:-1] + chr(ord(name[-1]) + 1), device) for name, device in named]


def _store_volume_name(device: _Device) -> str | None:
    """The volume store entry behind a device; None for the instance's own disks and image overlays."""
    source = device.source
    return source.name if source is not None and not source.from_image else None


def _taps(inst: _Instance) -> list[str]:
    """Host-side names exist while the domain runs, as libvirt's taps do."""
    if inst.state not in _ACTIVE:
        return []
    return [f"tap{inst.spec.uuid[:8]}-{i}" for i in range(len(inst.spec.interfaces))]


def _changed_fields(running: InstanceSpec, defined: InstanceSpec) -> list[str]:
    """The spec fields in which ``defined`` differs from what runs, in the libvirt driver's terms and
    order."""
    fields = []
    if running.vcpus != defined.vcpus:
        fields.append("spec.flavor.vcpus")
    if running.memory_mib != defined.memory_mib:
        fields.append("spec.flavor.memoryMiB")
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


def _block_stats(counters: _BlockCounters) -> BlockStats:
    return BlockStats(**dataclasses.asdict(counters))


def _interface_stats(inst: _Instance, now: float) -> InterfaceStats:
    """Every interface carries the same simulated traffic (see DHCP_BYTES and FRAME_BYTES)."""
    seconds = math.floor(inst.guest.lifetime_seconds(now))
    packets = inst.guest.boots + seconds
    octets = inst.guest.boots * DHCP_BYTES + seconds * FRAME_BYTES
    return InterfaceStats(
        rx_bytes=octets,
        rx_packets=packets,
        rx_errs=0,
        rx_drop=0,
        tx_bytes=octets,
        tx_packets=packets,
        tx_errs=0,
        tx_drop=0,
    )


def _bases(files: Iterable[_Disk]) -> set[str]:
    return {disk.base for disk in files if disk.base is not None}


class FakeDriver(ComputeDriver):
    """Instances, images and volumes in dictionaries, behind one lock; see the module docstring.

    Migrations need a second host: every FakeDriver registers under its ``uri`` in a
    process-wide registry, and ``dest_uri`` names another FakeDriver in it.
    """

    _registry: ClassVar[weakref.WeakValueDictionary[str, FakeDriver]] = weakref.WeakValueDictionary()

    def __init__(
        self,
        hostname: str | None = None,
        *,
        uri: str | None = None,
        images: Mapping[str, bytes] | None = None,
        vcpus: int = 8,
        memory_mib: int = 16384,
        disk_gib: int = 100,
        cpu: CpuInfo | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hostname = hostname or socket.gethostname()
        self.uri = uri or f"fake://{self.hostname}"
        self.vcpus = vcpus
        self.memory_mib = memory_mib
        self.disk_gib = disk_gib
        self.cpu = cpu or CpuInfo(
            arch="x86_64",
            vendor="Fake",
            model="fake64",
            sockets=1,
            cores=vcpus,
            threads=1,
            features=DEFAULT_CPU_FEATURES,
        )
        self._clock = clock
        # Re-entrant, so a test clock or callback may call back into the driver.
        self._lock = threading.RLock()
        self._images: dict[str, _Image] = {}
        #: the image cache: sha256 of each cached base -> when an instance last used it
        self._bases: dict[str, float] = {}
        self._volumes: dict[str, _Disk] = {}
        #: volume name -> (uuid, device) holding it: QEMU locks an image against a second writer
        self._volume_holders: dict[str, tuple[str, str]] = {}
        self._instances: dict[str, _Instance] = {}
        self._names: dict[tuple[str, str], str] = {}
        #: folders whose instance is not defined here: kept by destroy(destroy_disks=False),
        #: copied in by a cold migration or made by pre_live_migration
        self._instance_dirs: dict[str, dict[str, _Disk]] = {}
        self._prepared: dict[str, InstanceSpec] = {}
        self._aborts: set[str] = set()
        self._vifs: dict[str, dict[str, Interface]] = {}
        self._rules: dict[str, tuple[FirewallRule, ...]] = {}
        self._free_vnc: list[int] = []
        self._next_vnc = 0
        for name, data in (images or {}).items():
            self.add_image(name, data)
        self._registry[self.uri] = self

    # --- outside the contract: what a test or benchmark sets up and looks at --------------------

    def add_image(self, name: str, data: bytes) -> None:
        """Put a file into the image store, as an operator would copy one onto the node."""
        with self._lock:
            self._images[name] = _Image(bytes(data), hashlib.sha256(data).hexdigest())

    def read_image(self, name: str) -> bytes:
        with self._lock:
            return self._images[name].data

    def read_volume(self, name: str) -> bytes:
        """The bytes written at the start of a volume; the rest of it reads as zeros."""
        with self._lock:
            return bytes(self._volume(name).data)

    def volume_size(self, name: str) -> int:
        """A volume's virtual size in bytes."""
        with self._lock:
            return self._volume(name).size

    def instance_files(self, uuid: str) -> list[str]:
        """The instance folder as the libvirt driver would have it, defined instance or not."""
        with self._lock:
            inst = self._instances.get(uuid)
            if inst is None:
                return sorted(self._instance_dirs.get(uuid, {}))
            names = set(inst.files)
            if inst.guest.boots:
                names.add(CONSOLE_LOG)
            if inst.rescue is not None:
                names.add(UNRESCUE)
            return sorted(names)

    def saved_memory_exists(self, uuid: str) -> bool:
        with self._lock:
            return self._get(uuid).state is PowerState.SUSPENDED

    def vnc_accepts(self, host: str, port: int, password: str) -> bool:
        """The VNC server at host:port, asked whether ``password`` opens it."""
        with self._lock:
            for inst in self._instances.values():
                if (
                    (host, port) == (VNC_HOST, VNC_BASE_PORT + inst.vnc_index)
                    and inst.state in _ACTIVE
                    and inst.spec.vnc_password is not None
                ):
                    return password == inst.spec.vnc_password
        raise ConnectionRefusedError(f"no VNC server listens on {host}:{port}")

    def vifs(self, uuid: str) -> tuple[Interface, ...]:
        """What plug_vifs set up for the instance and unplug_vifs has not released."""
        with self._lock:
            return tuple(self._vifs.get(uuid, {}).values())

    def filtering_rules(self, uuid: str) -> tuple[FirewallRule, ...]:
        """The firewall rules installed for the instance."""
        with self._lock:
            return self._rules.get(uuid, ())

    # --- host -----------------------------------------------------------------------------

    def init_host(self, host: str) -> None:
        """There is no hypervisor to reach; connecting means being the host migrations to ``uri`` reach."""
        self._registry[self.uri] = self

    def get_available_resource(self) -> HostStats:
        """The fake host measures itself: the memory its running and paused instances hold (a suspended
        one's is saved to disk), the store's images and volumes and every instance folder's files."""
        with self._lock:
            held_mib = sum(inst.spec.memory_mib for inst in self._instances.values() if inst.state in _ACTIVE)
            disks = [*self._volumes.values(), *(disk for files in self._folders() for disk in files.values())]
            used = sum(len(image.data) for image in self._images.values())
            used += sum(disk.allocated for disk in disks)
            # what the copy-on-write disks may still take, each up to its virtual size
            growth = sum(disk.size - disk.allocated for disk in disks)
        return HostStats(
            vcpus=self.vcpus,
            memory_mib=self.memory_mib,
            memory_free_mib=max(0, self.memory_mib - held_mib),
            disk_gib=self.disk_gib,
            disk_free_gib=max(0, (self.disk_gib * GIB - used) // GIB),
            disk_available_least_gib=max(0, (self.disk_gib * GIB - used - growth) // GIB),
            hypervisor_type="fake",
            hypervisor_version="1.0.0",
            hostname=self.hostname,
            cpu=self.cpu,
        )

    def host_power_action(self, action: HostPowerAction) -> None:
        raise Unsupported("host_power_action", "the fake host has no power")

    def compare_cpu(self, cpu: CpuInfo) -> None:
        if not cpu.arch or not cpu.model:
            raise InvalidCPUInfo("the CPU description needs an arch and a model")
        if cpu.arch != self.cpu.arch:
            raise CPUIncompatible(f"guests made for {cpu.arch} cannot run on this {self.cpu.arch} host")
        missing = sorted(set(cpu.features) - set(self.cpu.features))
        if missing:
            raise CPUIncompatible(f"this host's CPU lacks {', '.join(missing)}")

    def get_volume_connector(self) -> VolumeConnector:
        return VolumeConnector(ip="127.0.0.1", initiator=None, host=self.hostname)

    def manage_image_cache(self, in_use: Collection[str], grace_seconds: float) -> list[str]:
        """Removes cached bases (named by their sha256, like the libvirt driver's); the store stays as it
        is."""
        with self._lock:
            now = self._clock()
            used = _bases(disk for files in self._folders() for disk in files.values())
            used |= {self._images[name].sha256 for name in in_use if name in self._images}
            self._touch(used, now)
            removed = sorted(
                digest
                for digest, last_used in self._bases.items()
                if digest not in used and now - last_used > grace_seconds
            )
            for digest in removed:
                del self._bases[digest]
            return removed

    # --- instances: existence and state ------------------------------------------------------

    def list_instances(self) -> list[str]:
        with self._lock:
            return list(self._instances)

    def list_instances_detail(self) -> list[InstanceDetail]:
        with self._lock:
            return [
                InstanceDetail(
                    uuid=i.spec.uuid,
                    namespace=i.spec.namespace,
                    name=i.spec.name,
                    state=i.state,
                    vcpus=i.spec.vcpus,
                    memory_mib=i.spec.memory_mib,
                )
                for i in self._instances.values()
            ]

    def instance_exists(self, uuid: str) -> bool:
        with self._lock:
            return uuid in self._instances

    def get_info(self, uuid: str) -> InstanceInfo:
        with self._lock:
            inst = self._get(uuid)
            memory_kib = inst.spec.memory_mib * 1024
            return InstanceInfo(
                inst.state, memory_kib, memory_kib, inst.spec.vcpus, self._cpu_time_ns(inst, self._clock())
            )

    # --- instances: life cycle -------------------------------------------------------------

    def spawn(self, instance: InstanceSpec, power_on: bool = True) -> None:
        with self._lock:
            now = self._clock()
            existing = self._instances.get(instance.uuid)
            if existing is not None:  # a retry: the same object, never a second instance
                if power_on:
                    self._power_on(existing, now)
                return
            folder = self._instance_dirs.get(instance.uuid, {})
            self._validate(instance, folder)
            inst = self._create(instance, folder, now)
            self._instance_dirs.pop(instance.uuid, None)
            self._admit(inst)
            self.plug_vifs(instance.uuid, instance.interfaces)
            if power_on:
                self._boot(inst, now)

    def redefine(self, instance: InstanceSpec) -> None:
        """Disks grow at once; the rest waits for the next boot, as libvirt's persistent definition does."""
        with self._lock:
            now = self._clock()
            inst = self._get(instance.uuid)
            self._validate(instance, inst.files)
            self.plug_vifs(instance.uuid, instance.interfaces)
            sizes = {f"disk.eph.{name}": gib * GIB for name, gib in instance.ephemeral_gib}
            sizes.update({ROOT: (instance.root_gib or 0) * GIB, SWAP: (instance.swap_mib or 0) * MIB})
            for name, size in sizes.items():
                if name in inst.files:
                    inst.files[name].size = max(inst.files[name].size, size)
            inst.defined = instance
            if inst.state in (PowerState.SHUTOFF, PowerState.CRASHED, PowerState.NOSTATE):
                self._apply_definition(inst, now)

    def defined_revision(self, uuid: str) -> str:
        with self._lock:
            inst = self._get(uuid)
            return (inst.defined or inst.spec).revision

    def pending_changes(self, uuid: str) -> list[str]:
        with self._lock:
            inst = self._get(uuid)
            if inst.defined is None or inst.rescue is not None or inst.state not in _ACTIVE:
                return []
            return _changed_fields(inst.spec, inst.defined)

    def destroy(self, uuid: str, destroy_disks: bool = True) -> None:
        """Also unplugs and unfilters, as Nova's libvirt driver does: a stopped domain has no taps."""
        with self._lock:
            now = self._clock()
            self._aborts.discard(uuid)
            self._prepared.pop(uuid, None)  # its folder, made by pre_live_migration, goes below
            self._vifs.pop(uuid, None)
            self._rules.pop(uuid, None)
            inst = self._instances.get(uuid)
            if inst is not None:
                inst.guest.stop(now)
                self._release(inst, now)
                if not destroy_disks:
                    self._instance_dirs[uuid] = inst.files
            if destroy_disks:
                self._instance_dirs.pop(uuid, None)

    def reboot(self, uuid: str, reboot_type: RebootType, soft_timeout: float = 60.0) -> RebootType:
        """The guest ignores ACPI, like the real test guest, so a soft reboot ends as a hard one."""
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *_ACTIVE)
            start = inst.rebooting_since = self._clock()
        if reboot_type is RebootType.SOFT:
            self._let_soft_timeout_pass(start, soft_timeout)
        with self._lock:
            inst = self._get(uuid)
            inst.rebooting_since = None
            self._boot(inst, self._clock())
        return RebootType.HARD

    def power_off(self, uuid: str) -> None:
        """A suspended instance loses its saved memory: stopped means stopped."""
        with self._lock:
            inst = self._get(uuid)
            inst.guest.stop(self._clock())
            inst.state = PowerState.SHUTOFF

    def power_on(self, uuid: str) -> None:
        """Also lets a paused instance run on, as the libvirt driver does."""
        with self._lock:
            self._power_on(self._get(uuid), self._clock())

    def pause(self, uuid: str) -> None:
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *_ACTIVE)
            inst.guest.stop(self._clock())
            inst.state = PowerState.PAUSED

    def unpause(self, uuid: str) -> None:
        with self._lock:
            inst = self._get(uuid)
            if inst.state is PowerState.PAUSED:
                self._continue(inst, self._clock())

    def suspend(self, uuid: str) -> None:
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *_ACTIVE)
            inst.guest.stop(self._clock())
            inst.state = PowerState.SUSPENDED

    def resume(self, uuid: str) -> None:
        with self._lock:
            inst = self._get(uuid)
            if inst.state is PowerState.SUSPENDED:
                self._continue(inst, self._clock())

    def rescue(self, uuid: str, rescue_image: ImageRef) -> None:
        """Any power state: rescue is for instances that do not come up, which are often stopped."""
        with self._lock:
            now = self._clock()
            inst = self._get(uuid)
            if inst.rescue is not None:
                return
            inst.files[RESCUE_DISK] = self._overlay(rescue_image, "spec.rescue.image", now)
            inst.rescue = _Device(inst.files[RESCUE_DISK])
            inst.rescued_since = now
            self._boot(inst, now)

    def unrescue(self, uuid: str) -> None:
        with self._lock:
            now = self._clock()
            inst = self._get(uuid)
            if inst.rescue is None:
                return
            self._touch(_bases(inst.files.values()), now)
            del inst.files[RESCUE_DISK]
            inst.rescue = inst.rescued_since = None
            self._boot(inst, now)

    def snapshot(self, uuid: str, image_name: str, progress: Callable[[int], None] | None = None) -> str:
        with self._lock:
            root = self._get(uuid).files.get(ROOT)
            if root is None:
                raise Unsupported(
                    "snapshot", "the instance has no root disk (direct kernel boot without spec.rootDisk)"
                )
            field = "spec.actions.snapshot.imageName"
            _plain_name(field, image_name)
            if image_name in self._images:
                raise InvalidInstanceSpec(field, f"image {image_name!r} already exists in the image store")
            self.add_image(image_name, bytes(root.data))
        if progress is not None:
            progress(100)
        return image_name

    # --- guest access ----------------------------------------------------------------------

    def get_console_output(self, uuid: str) -> str:
        with self._lock:
            return self._get(uuid).guest.render(self._clock())

    def get_vnc_console(self, uuid: str) -> VncConsole:
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *_ACTIVE)
            if inst.spec.vnc_password is None:
                raise Unsupported(
                    "get_vnc_console",
                    "the instance was created without a VNC password, so it has no VNC server",
                )
            return VncConsole(
                host=VNC_HOST, port=VNC_BASE_PORT + inst.vnc_index, password=inst.spec.vnc_password
            )

    def set_admin_password(self, uuid: str, password: str) -> None:
        with self._lock:
            self._require(self._get(uuid), *_ACTIVE)
        raise Unsupported(
            "set_admin_password",
            "the guest runs no QEMU guest agent; the password on the config drive applies at first boot",
        )

    # --- diagnostics -----------------------------------------------------------------------

    def get_diagnostics(self, uuid: str) -> Diagnostics:
        with self._lock:
            now = self._clock()
            inst = self._get(uuid)
            self._require(inst, *_ACTIVE)
            stats = _interface_stats(inst, now)
            return Diagnostics(
                cpu_time_ns=self._cpu_time_ns(inst, now),
                memory_kib=inst.spec.memory_mib * 1024,
                disks={name: _block_stats(device.counters) for name, device in _layout(inst)},
                interfaces={tap: stats for tap in _taps(inst)},
            )

    def list_disks(self, uuid: str) -> list[str]:
        with self._lock:
            return [name for name, _ in _layout(self._get(uuid))]

    def list_interfaces(self, uuid: str) -> list[str]:
        with self._lock:
            return _taps(self._get(uuid))

    def list_interfaces_detail(self, uuid: str) -> list[InterfaceDetail]:
        with self._lock:
            spec = self._get(uuid).spec
            return [
                InterfaceDetail(i.name, mac, i.network)
                for i, mac in zip(spec.interfaces, spec.macs(), strict=True)
            ]

    def block_stats(self, uuid: str, disk: str) -> BlockStats:
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *_ACTIVE)
            devices = dict(_layout(inst))
            if disk not in devices:
                raise VolumeNotFound(
                    f"instance {uuid} has no disk {disk}; it has {', '.join(devices) or 'none'}"
                )
            return _block_stats(devices[disk].counters)

    def interface_stats(self, uuid: str, interface: str) -> InterfaceStats:
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *_ACTIVE)
            taps = _taps(inst)
            if interface not in taps:
                raise DriverError(
                    f"instance {uuid} has no interface {interface}; it has {', '.join(taps) or 'none'}"
                )
            return _interface_stats(inst, self._clock())

    # --- volumes ---------------------------------------------------------------------------

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
            in_use = _device_names(inst)
            device = device or self._free_device(in_use, "vd" if volume.bus == "virtio" else "sd")
            if device in in_use:
                raise InvalidInstanceSpec(
                    "spec.device.name", f"{device} is already in use on instance {uuid}"
                )
            if volume.from_image:
                overlay = self._overlay(ImageRef(volume.name), "spec.image.name", now)
                disk = inst.files.setdefault(f"disk.vol.{volume.name}", overlay)
            else:
                disk = self._store_volume(volume)
                self._volume_holders[volume.name] = (uuid, device)
            inst.volumes[device] = _Device(disk, read_only=volume.read_only, source=volume)
            self._guest_writes(inst, now)
            return device

    def detach_volume(self, uuid: str, device: str) -> None:
        with self._lock:
            inst = self._get(uuid)
            attached = inst.volumes.pop(device, None)
            if attached is None:
                raise VolumeNotFound(f"no volume is attached at {device} on instance {uuid}")
            name = _store_volume_name(attached)
            if name is not None:
                del self._volume_holders[name]
            self._touch(_bases([attached.disk]), self._clock())

    # --- networking ------------------------------------------------------------------------

    def plug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        """Recorded per instance, defined or not: spawn plugs its own, Nova plugs before a migration too."""
        with self._lock:
            if interfaces:
                self._vifs.setdefault(uuid, {}).update((iface.name, iface) for iface in interfaces)

    def unplug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        with self._lock:
            plugged = self._vifs.get(uuid, {})
            for iface in interfaces:
                plugged.pop(iface.name, None)
            if not plugged:
                self._vifs.pop(uuid, None)

    def ensure_filtering_rules_for_instance(self, uuid: str, rules: Collection[FirewallRule]) -> None:
        with self._lock:
            self._rules[uuid] = tuple(rules)

    def unfilter_instance(self, uuid: str) -> None:
        with self._lock:
            self._rules.pop(uuid, None)

    # --- migration -------------------------------------------------------------------------

    def migrate_disk_and_power_off(self, uuid: str, dest_uri: str) -> list[str]:
        """Returns the names of the files copied into the destination's instance folder.

        The config drive is not among them: finish_migration writes it afresh from the spec.
        """
        with self._lock:
            inst = self._get(uuid)
            self._refuse_rescued(inst)
            dest = self._peer(dest_uri)
            inst.guest.stop(self._clock())
            inst.state = PowerState.SHUTOFF
            copies = {name: disk.copy() for name, disk in inst.files.items() if name != CONFIG_DRIVE}
        with dest._lock:
            dest._instance_dirs[uuid] = copies
        return sorted(copies)

    def finish_migration(
        self, instance: InstanceSpec, disk_info: list[str], source_uri: str, power_on: bool = True
    ) -> None:
        """The fake's source already pushed the files; they must be the ones ``disk_info`` names."""
        self._peer(source_uri)
        with self._lock:
            now = self._clock()
            existing = self._instances.get(instance.uuid)
            if existing is not None:  # a retry
                if power_on:
                    self._power_on(existing, now)
                return
            folder = self._instance_dirs.get(instance.uuid)
            if folder is None:
                raise DriverError(
                    f"no disks of instance {instance.uuid} arrived on {self.hostname}; "
                    "run migrate_disk_and_power_off on the source first"
                )
            if sorted(folder) != sorted(posixpath.basename(d) for d in disk_info):
                raise DriverError(
                    f"the disks that arrived ({sorted(folder)}) are not the ones the source "
                    f"named ({sorted(disk_info)})"
                )
            self._validate(instance, folder)
            inst = self._create(instance, folder, now)
            del self._instance_dirs[instance.uuid]
            self._admit(inst)
            self.plug_vifs(instance.uuid, instance.interfaces)
            if power_on:
                self._boot(inst, now)

    def confirm_migration(self, uuid: str) -> None:
        self.destroy(uuid)

    def finish_revert_migration(self, uuid: str, power_on: bool = True) -> None:
        with self._lock:
            inst = self._get(uuid)
            if power_on:
                self._power_on(inst, self._clock())

    def pre_live_migration(self, instance: InstanceSpec) -> str:
        """The fake's "definition" is the target's own name for the prepared instance."""
        with self._lock:
            if instance.uuid in self._instances:
                raise DriverError(f"instance {instance.uuid} is already defined on {self.hostname}")
            folder = self._instance_dirs.get(instance.uuid, {})
            self._validate(instance, folder)
            self._instance_dirs[instance.uuid] = self._create(instance, folder, self._clock()).files
            self._prepared[instance.uuid] = instance
            self.plug_vifs(instance.uuid, instance.interfaces)
        return f"{self.uri}/{instance.uuid}"

    def live_migration(
        self,
        uuid: str,
        dest_uri: str,
        dest_definition: str,
        progress: ProgressCallback | None = None,
        block_migration: bool = True,
        max_bandwidth_mib: int | None = None,
    ) -> None:
        """Completes synchronously, in a few steps; an abort requested before a step stops it there.

        The fake's hosts share no storage, so the instance folder and attached volumes always travel.
        """
        if dest_definition != f"{dest_uri}/{uuid}":
            raise DriverError(f"{dest_definition!r} is not what pre_live_migration on {dest_uri} returned")
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *_ACTIVE)
            self._refuse_rescued(inst)
            dest = self._peer(dest_uri)
            total = inst.spec.memory_mib * MIB
            if block_migration:
                total += sum(disk.size for disk in inst.files.values())
        with dest._lock:
            if uuid not in dest._prepared:
                raise DriverError(
                    f"{dest.hostname} is not prepared for instance {uuid}; run pre_live_migration there first"
                )
        for iteration in range(1, LIVE_MIGRATION_ITERATIONS + 1):
            with self._lock:
                self._check_abort(uuid)
            done = total * iteration // LIVE_MIGRATION_ITERATIONS
            if progress is not None:
                progress(
                    MigrationProgress(
                        data_total=total,
                        data_processed=done,
                        data_remaining=total - done,
                        iteration=iteration,
                        expected_downtime_ms=EXPECTED_DOWNTIME_MS,
                    )
                )
        with self._lock:
            self._check_abort(uuid)
            inst = self._get(uuid)
            now = self._clock()
            inst.guest.stop(now)
            inst.guest.console.clear()  # the serial log is a file of the host the guest left
            self._release(inst, now)
            volumes = {
                device: (name, attached.disk.copy())
                for device, attached in inst.volumes.items()
                if (name := _store_volume_name(attached)) is not None
            }
        try:
            dest._arrive(inst, volumes)
        except DriverError:
            with self._lock:
                self._admit(inst)
                if inst.state is PowerState.RUNNING:
                    inst.guest.run(self._clock())
            raise

    def abort_live_migration(self, uuid: str) -> None:
        """Marks the instance; its migration, running or next, stops at the next step and stays here."""
        with self._lock:
            self._get(uuid)
            self._aborts.add(uuid)

    def post_live_migration_at_destination(self, uuid: str) -> MigrationOutcome:
        with self._lock:
            self._get(uuid)
            self._prepared.pop(uuid, None)
        return MigrationOutcome()  # the fake's switch-over is instantaneous and unmeasured

    def rollback_live_migration_at_destination(self, uuid: str) -> None:
        with self._lock:
            spec = self._prepared.pop(uuid, None)
            if spec is None or uuid in self._instances:
                return
            self._instance_dirs.pop(uuid, None)
            self.unplug_vifs(uuid, spec.interfaces)

    # --- pollers ---------------------------------------------------------------------------

    def poll_rebooting_instances(self, timeout: float) -> list[str]:
        with self._lock:
            now = self._clock()
            return [
                uuid
                for uuid, inst in self._instances.items()
                if inst.rebooting_since is not None and now - inst.rebooting_since > timeout
            ]

    def poll_rescued_instances(self, timeout: float) -> list[str]:
        with self._lock:
            now = self._clock()
            return [
                uuid
                for uuid, inst in self._instances.items()
                if inst.rescued_since is not None and now - inst.rescued_since > timeout
            ]

    # --- internals (callers hold the lock) ------------------------------------------------------

    def _get(self, uuid: str) -> _Instance:
        try:
            return self._instances[uuid]
        except KeyError:
            raise InstanceNotFound(uuid) from None

    def _volume(self, name: str) -> _Disk:
        try:
            return self._volumes[name]
        except KeyError:
            raise VolumeNotFound(f"no volume {name!r} in the volume store of {self.hostname}") from None

    def _folders(self) -> Iterable[Mapping[str, _Disk]]:
        """Every instance folder on the host, whether its instance is defined here or not."""
        yield from (inst.files for inst in self._instances.values())
        yield from self._instance_dirs.values()

    @staticmethod
    def _require(inst: _Instance, *states: PowerState) -> None:
        if inst.state not in states:
            raise InstanceNotRunning(f"instance {inst.spec.uuid} is {inst.state.value}")

    @staticmethod
    def _refuse_rescued(inst: _Instance) -> None:
        if inst.rescue is not None:
            raise DriverError(f"instance {inst.spec.uuid} is in rescue; unrescue it before migrating it")

    @staticmethod
    def _cpu_time_ns(inst: _Instance, now: float) -> int:
        """libvirt reports no CPU time for a domain without a process."""
        return int(inst.guest.seconds(now) * CPU_SHARE * 1e9) if inst.state in _ACTIVE else 0

    def _peer(self, dest_uri: str) -> FakeDriver:
        if dest_uri == self.uri:
            raise DriverError(f"{dest_uri} is this host; a migration needs another one")
        dest = self._registry.get(dest_uri)
        if dest is None:
            raise DriverError(f"no fake host is registered at {dest_uri}")
        return dest

    def _check_abort(self, uuid: str) -> None:
        if uuid in self._aborts:
            self._aborts.discard(uuid)
            raise DriverError(
                f"the live migration of instance {uuid} was aborted; it stays on {self.hostname}"
            )

    def _check_name_free(self, spec: InstanceSpec) -> None:
        holder = self._names.get((spec.namespace, spec.name))
        if holder is not None and holder != spec.uuid:
            raise InstanceExists(
                f"{spec.namespace}/{spec.name} is already instance {holder} on {self.hostname}"
            )

    def _checked_image(self, ref: ImageRef, field: str) -> _Image:
        """An image from the store, checked like the libvirt driver's image cache checks it."""
        _plain_name(field, ref.name)
        image = self._images.get(ref.name)
        if image is None:
            raise ImageNotFound(
                field,
                f"image {ref.name!r} is not in the image store of {self.hostname}; "
                "copy it there or fix the name",
            )
        if ref.checksum and ref.checksum != f"sha256:{image.sha256}":
            raise ImageChecksumMismatch(
                field.rsplit(".", 1)[0] + ".checksum",
                f"image {ref.name!r} has sha256:{image.sha256}, the spec expects {ref.checksum}",
            )
        return image

    def _overlay(self, ref: ImageRef, field: str, now: float) -> _Disk:
        """A copy-on-write disk on the image's cached base."""
        image = self._checked_image(ref, field)
        self._bases[image.sha256] = now
        return _Disk(len(image.data), image.data, image.sha256, cow=True)

    def _validate(self, spec: InstanceSpec, folder: Mapping[str, _Disk]) -> None:
        """Everything spawn can refuse, checked before anything is made, so a failure leaves nothing."""
        self._check_name_free(spec)
        check_instance(spec, self.memory_mib)
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

    def _create(self, spec: InstanceSpec, folder: Mapping[str, _Disk], now: float) -> _Instance:
        """A stopped instance whose disks are the folder's (kept or migrated) where it has them, else new."""
        files = dict(folder)
        local: dict[str, _Device] = {}

        def boot_disk(name: str, size: int) -> None:
            disk = files.setdefault(name, _Disk(0, cow=True))
            disk.size = max(disk.size, size)  # grown to the flavor, never shrunk
            local[name] = _Device(disk)

        if spec.image is not None and ROOT not in files:
            files[ROOT] = self._overlay(spec.image, "spec.boot.image.name", now)
        if spec.image is not None or spec.root_gib:
            boot_disk(ROOT, (spec.root_gib or 0) * GIB)
        for name, gib in spec.ephemeral_gib:
            boot_disk(f"disk.eph.{name}", gib * GIB)
        if spec.swap_mib:
            boot_disk(SWAP, spec.swap_mib * MIB)
        if cloudinit.needed(spec):
            files[CONFIG_DRIVE] = _Disk(_iso_size(cloudinit.files(spec)))
            local[CONFIG_DRIVE] = _Device(files[CONFIG_DRIVE], read_only=True)
        self._touch(_bases(files.values()), now)
        return _Instance(
            spec=spec,
            state=PowerState.SHUTOFF,
            files=files,
            local=local,
            write_hook=_write_hook(spec.boot),
        )

    def _admit(self, inst: _Instance) -> None:
        """Make the instance one of this host's: its name, a VNC display and its volumes' locks."""
        uuid = inst.spec.uuid
        self._instances[uuid] = inst
        self._names[(inst.spec.namespace, inst.spec.name)] = uuid
        if self._free_vnc:
            inst.vnc_index = heapq.heappop(self._free_vnc)
        else:
            inst.vnc_index, self._next_vnc = self._next_vnc, self._next_vnc + 1
        for device, attached in inst.volumes.items():
            name = _store_volume_name(attached)
            if name is not None:
                self._volume_holders[name] = (uuid, device)

    def _release(self, inst: _Instance, now: float) -> None:
        uuid = inst.spec.uuid
        del self._instances[uuid]
        del self._names[(inst.spec.namespace, inst.spec.name)]
        heapq.heappush(self._free_vnc, inst.vnc_index)
        for attached in inst.volumes.values():
            name = _store_volume_name(attached)
            if name is not None:
                del self._volume_holders[name]
        # the image cache's grace period counts from the last moment an instance used a base
        self._touch(_bases(inst.files.values()), now)

    def _arrive(self, inst: _Instance, volumes: Mapping[str, tuple[str, _Disk]]) -> None:
        """The destination side of a live migration: the instance, its folder and volumes now live here.

        ``volumes`` maps a guest device to the store name and a copy of the volume behind it.
        """
        with self._lock:
            uuid = inst.spec.uuid
            if uuid in self._instances:
                raise DriverError(f"instance {uuid} is already defined on {self.hostname}")
            self._check_name_free(inst.spec)
            for name, _ in volumes.values():
                holder = self._volume_holders.get(name)
                if holder is not None:
                    raise DriverError(
                        f"volume {name!r} is attached to instance {holder[0]} on {self.hostname}"
                    )
            for device, (name, disk) in volumes.items():
                self._volumes[name] = inst.volumes[device].disk = disk
            self._instance_dirs.pop(uuid, None)
            now = self._clock()
            self._touch(_bases(inst.files.values()), now)
            self._admit(inst)
            if inst.state is PowerState.RUNNING:
                inst.guest.run(now)

    def _store_volume(self, volume: VolumeSpec) -> _Disk:
        _plain_name("spec.volume.name", volume.name)
        holder = self._volume_holders.get(volume.name)
        if holder is not None:
            raise DriverError(
                f"volume {volume.name!r} is attached to instance {holder[0]} at {holder[1]}; "
                "detach it there first"
            )
        disk = self._volumes.get(volume.name)
        if disk is None:
            if not volume.size_gib:
                raise InvalidInstanceSpec(
                    "spec.volume.sizeGiB", f"volume {volume.name!r} does not exist; give a size to create it"
                )
            disk = self._volumes[volume.name] = _Disk(volume.size_gib * GIB, bytearray())
        return disk

    @staticmethod
    def _free_device(in_use: set[str], prefix: str) -> str:
        for letter in "abcdefghijklmnopqrstuvwxyz":
            if prefix + letter not in in_use:
                return prefix + letter
        raise InvalidInstanceSpec("spec.device.name", f"no {prefix}* device name is free")

    def _touch(self, digests: Iterable[str], now: float) -> None:
        for digest in digests:
            self._bases[digest] = now

    def _apply_definition(self, inst: _Instance, now: float) -> None:
        """The definition redefine left for the next boot becomes the instance's (its disks as _create makes
        them)."""
        if inst.defined is None:
            return
        fresh = self._create(inst.defined, inst.files, now)
        inst.spec, inst.files, inst.local = fresh.spec, fresh.files, fresh.local
        inst.write_hook, inst.defined = fresh.write_hook, None

    def _boot(self, inst: _Instance, now: float) -> None:
        """A fresh boot: whatever ran (or was saved) is gone; the guest prints its boot lines."""
        self._apply_definition(inst, now)
        inst.state = PowerState.RUNNING
        layout = _layout(inst)
        for _, device in layout:  # the guest reads each disk's first sector to print its head
            device.counters.rd_req += 1
            device.counters.rd_bytes += SECTOR
        lines = [f"{RESCUE_MARKER if inst.rescue else BOOT_MARKER} kernel=fake"]
        lines += [
            f"{DISK_LINE} {name} sectors={device.disk.sectors} head={device.disk.head()}"
            for name, device in sorted(layout, key=lambda named: named[0])
        ]
        if CONFIG_DRIVE in inst.files:
            lines += [
                f"{CD_FILE_LINE} {path} {base64.b64encode(data).decode()}"
                for path, data in sorted(cloudinit.files(inst.spec).items())
            ]
        if inst.spec.interfaces:
            lines.append(f"{NET_LINE} eth0 up")
        inst.guest.mac = inst.spec.macs()[0] if inst.spec.interfaces else None
        inst.guest.boot(now, lines)
        self._guest_writes(inst, now)

    def _continue(self, inst: _Instance, now: float) -> None:
        """Unpause or restore: the same boot runs on, so the tick count goes on where it stopped."""
        inst.state = PowerState.RUNNING
        inst.guest.run(now)
        self._guest_writes(inst, now)

    def _power_on(self, inst: _Instance, now: float) -> None:
        if inst.state in (PowerState.PAUSED, PowerState.SUSPENDED):
            self._continue(inst, now)
        elif inst.state is not PowerState.RUNNING:
            self._boot(inst, now)

    def _guest_writes(self, inst: _Instance, now: float) -> None:
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
        device = dict(_layout(inst)).get(name)
        if device is None:
            return
        inst.guest.wrote = True
        if device.read_only:
            return
        payload = pattern.encode()
        device.disk.write(payload)
        device.counters.wr_req += 1
        device.counters.wr_bytes += len(payload)
        inst.guest.print(now, f"{WROTE_LINE} {name} {pattern}")

    def _let_soft_timeout_pass(self, start: float, timeout: float) -> None:
        """Wait out ``timeout`` on the clock, outside the lock, so pollers see the reboot pending.

        The real driver sleeps a poll interval between looks at the guest; the fake never
        sleeps. It re-reads the clock instead, and a clock that has not moved a whole interval
        since the last look will not move while this thread spins (a test clock stands still,
        the real one moves by nanoseconds), so the timeout then counts as elapsed.
        """
        last = start
        while (now := self._clock()) - start < timeout and now - last >= SOFT_REBOOT_POLL:
            last = now
