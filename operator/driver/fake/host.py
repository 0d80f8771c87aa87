"""The fake host: its state behind one lock, its figures, stores and networks, and the look-ups all use.

FakeDriver is made of layers over this class (instances, life cycle, guest access, volumes, migration), one
module each; they share this state and lock.
"""

from __future__ import annotations

import hashlib
import pathlib
import socket
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import ClassVar

from kubenova.driver.base import (
    ComputeDriver,
    Convergence,
    CPUIncompatible,
    CpuInfo,
    Credentials,
    DriverError,
    FirewallRule,
    GuestAgentInfo,
    HostPowerAction,
    HostStats,
    ImageChecksumMismatch,
    ImageNotFound,
    ImageRef,
    InstanceExists,
    InstanceNotFound,
    InstanceNotRunning,
    InstanceSpec,
    Interface,
    InvalidCPUInfo,
    NodeNetwork,
    PowerState,
    Progress,
    Unsupported,
    VolumeConnector,
    VolumeNotFound,
)
from kubenova.driver.fake.disks import (
    CONSOLE_LOG,
    GIB,
    UNRESCUE,
    Disk,
    Image,
    bases_of,
    imported_key,
    plain_name,
    snapshot_key,
    store_key,
)
from kubenova.driver.fake.instance import ACTIVE, GuestAgent, Instance
from kubenova.driver.fake.serial import EchoConsole
from kubenova.driver.images import SNAPSHOTS
from kubenova.driver.imports import Importer

VNC_HOST, VNC_BASE_PORT = "127.0.0.1", 5900

#: The named CPU models a fake host can give a guest (spec.cpu.model), a few of QEMU's.
DEFAULT_CPU_MODELS = ("qemu64", "qemu32", "kvm64", "Nehalem", "Westmere", "SandyBridge")

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


class FakeHost(ComputeDriver):
    """Instances, images and volumes in dictionaries, behind one lock.

    Migrations need a second host: every fake host registers under its ``uri`` in a process-wide
    registry, and ``dest_uri`` names another one in it.
    """

    _registry: ClassVar[weakref.WeakValueDictionary[str, FakeHost]] = weakref.WeakValueDictionary()

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
        importer: Importer | None = None,
        cpu_models: tuple[str, ...] = DEFAULT_CPU_MODELS,
    ) -> None:
        """``importer`` brings images in by url or from a registry, for real, into its folder (none: such an
        image is Unsupported here)."""
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
        self.cpu_models = cpu_models
        self._clock = clock
        self._importer = importer
        # Re-entrant, so a test clock or callback may call back into the driver.
        self._lock = threading.RLock()
        self._images: dict[str, Image] = {}
        #: the image cache: sha256 of each cached base -> when an instance last used it
        self._bases: dict[str, float] = {}
        self._volumes: dict[str, Disk] = {}
        #: volume name -> (uuid, device) holding it: QEMU locks an image against a second writer
        self._volume_holders: dict[str, tuple[str, str]] = {}
        self._instances: dict[str, Instance] = {}
        self._names: dict[tuple[str, str], str] = {}
        #: folders whose instance is not defined here: kept by destroy(destroy_disks=False),
        #: copied in by a cold migration or made by pre_live_migration
        self._instance_dirs: dict[str, dict[str, Disk]] = {}
        self._prepared: dict[str, InstanceSpec] = {}
        self._aborts: set[str] = set()
        #: the live transfers running from here, with how each may force its end
        self._transfers: dict[str, Convergence] = {}
        #: transfers switched to post-copy; and those whose link a test breaks once they are
        self._post_copy: set[str] = set()
        self._post_copy_breaks: set[str] = set()
        self._vifs: dict[str, dict[str, Interface]] = {}
        self._rules: dict[str, tuple[FirewallRule, ...]] = {}
        self._provider: tuple[FirewallRule, ...] = ()
        #: the node network, and the address reserved for each MAC on it
        self._network: NodeNetwork | None = None
        self._reserved: dict[str, str] = {}
        self._free_vnc: list[int] = []
        self._next_vnc = 0
        #: the serial sockets asked for so far (fake/serial.py), in a folder made at the first
        self._consoles: dict[str, EchoConsole] = {}
        self._console_dir: pathlib.Path | None = None
        #: the file system of the instances' files has no room left (fill_instances_disk)
        self._disk_full = False
        for name, data in (images or {}).items():
            self.add_image(name, data)
        self._registry[self.uri] = self

    # --- outside the contract: what a test or benchmark sets up and looks at ----------------------

    def add_image(self, name: str, data: bytes) -> None:
        """Put a file into the image store, as an operator would copy one onto the node."""
        with self._lock:
            self._images[name] = Image(bytes(data), hashlib.sha256(data).hexdigest())

    def read_image(self, name: str) -> bytes:
        with self._lock:
            return self._images[name].data

    def read_volume(self, namespace: str, name: str) -> bytes:
        """The bytes written at the start of a namespace's volume; the rest of it reads as zeros."""
        with self._lock:
            return bytes(self._volume(store_key(namespace, name)).data)

    def volume_size(self, namespace: str, name: str) -> int:
        """A namespace's volume's virtual size in bytes."""
        with self._lock:
            return self._volume(store_key(namespace, name)).size

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
                    and inst.state in ACTIVE
                    and inst.spec.vnc_password is not None
                ):
                    return password == inst.spec.vnc_password
        raise ConnectionRefusedError(f"no VNC server listens on {host}:{port}")

    def fill_instances_disk(self, uuid: str) -> None:
        """The file system of the instances' files fills up while the running guest ``uuid`` writes: QEMU
        stops it rather than fail its write (``werror=enospc``), and libvirt says PAUSED, reason IOERROR.

        Until free_instances_disk, a guest let run again retries its write and stops again at once.
        """
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, PowerState.RUNNING)
            self._disk_full = True
            inst.guest.stop(self._clock())
            inst.state, inst.io_error = PowerState.PAUSED, True

    def free_instances_disk(self) -> None:
        """Room again on the instances' file system (an operator freed space)."""
        with self._lock:
            self._disk_full = False

    def install_guest_agent(self, uuid: str, info: GuestAgentInfo | None = None) -> GuestAgent:
        """The guest runs a QEMU guest agent from now on (as if its image had one); the test may make it hang
        or refuse to freeze through what this returns."""
        with self._lock:
            inst = self._get(uuid)
            inst.agent = GuestAgent(info=info)
            return inst.agent

    # --- host -------------------------------------------------------------------------------------

    def init_host(self, host: str) -> None:
        """There is no hypervisor to reach; connecting means being the host migrations to ``uri`` reach."""
        self._registry[self.uri] = self

    def get_available_resource(self) -> HostStats:
        """The fake host measures itself: the memory its running and paused instances hold (a suspended
        one's is saved to disk), the store's images and volumes and every instance folder's files."""
        with self._lock:
            held_mib = sum(inst.spec.memory_mib for inst in self._instances.values() if inst.state in ACTIVE)
            disks = [*self._volumes.values(), *(disk for files in self._folders() for disk in files.values())]
            used = sum(len(image.data) for image in self._images.values())
            used += sum(disk.allocated for disk in disks)
            # what the copy-on-write disks may still take, each up to its virtual size
            growth = sum(disk.size - disk.allocated for disk in disks)
            volumes = sum(disk.allocated for disk in self._volumes.values())
            snapshots = sum(len(i.data) for key, i in self._images.items() if key.startswith(f"{SNAPSHOTS}/"))
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
            volumes_gib=-(-volumes // GIB),
            snapshots_gib=-(-snapshots // GIB),
            cpu_models=self.cpu_models,
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

    def cached_image(self, image: ImageRef) -> str | None:
        with self._lock:
            found = self._importer.cached(image) if self._importer else None
            if found is None:
                return None
            if imported_key(found.name) not in self._images:
                self._images[imported_key(found.name)] = Image(found.read_bytes(), found.name)
            return found.name

    def import_image(self, image: ImageRef, credentials: Credentials | None, progress: Progress) -> str:
        if self._importer is None:
            raise Unsupported("import_image", f"the fake host {self.hostname} was made without an importer")
        digest = self._importer.fetch(image, credentials, progress).name
        self.cached_image(image)  # its bytes, for the disks made from it
        return digest

    def manage_image_cache(self, in_use: Collection[str], grace_seconds: float) -> list[str]:
        """Removes cached bases (named by their sha256, like the libvirt driver's); the store stays as it
        is."""
        with self._lock:
            now = self._clock()
            used = bases_of(disk for files in self._folders() for disk in files.values())
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

    # --- look-ups and the image store (callers hold the lock) -------------------------------------

    def _get(self, uuid: str) -> Instance:
        try:
            return self._instances[uuid]
        except KeyError:
            raise InstanceNotFound(uuid) from None

    def _volume(self, name: str) -> Disk:
        try:
            return self._volumes[name]
        except KeyError:
            raise VolumeNotFound(f"no volume {name!r} in the volume store of {self.hostname}") from None

    def _folders(self) -> Iterable[Mapping[str, Disk]]:
        """Every instance folder on the host, whether its instance is defined here or not."""
        yield from (inst.files for inst in self._instances.values())
        yield from self._instance_dirs.values()

    @staticmethod
    def _require(inst: Instance, *states: PowerState) -> None:
        if inst.state not in states:
            raise InstanceNotRunning(f"instance {inst.spec.uuid} is {inst.state.value}")

    @staticmethod
    def _refuse_rescued(inst: Instance) -> None:
        if inst.rescue is not None:
            raise DriverError(f"instance {inst.spec.uuid} is in rescue; unrescue it before migrating it")

    @staticmethod
    def _cpu_time_ns(inst: Instance, now: float) -> int:
        """libvirt reports no CPU time for a domain without a process."""
        return inst.guest.cpu_time_ns(now) if inst.state in ACTIVE else 0

    def _check_name_free(self, spec: InstanceSpec) -> None:
        holder = self._names.get((spec.namespace, spec.name))
        if holder is not None and holder != spec.uuid:
            raise InstanceExists(
                f"{spec.namespace}/{spec.name} is already instance {holder} on {self.hostname}"
            )

    def _checked_image(self, ref: ImageRef, field: str) -> Image:
        """An image from the store, checked like the libvirt driver's image cache checks it."""
        if ref.imported:
            digest = self.cached_image(ref)
            if digest is None:
                raise ImageNotFound(field, f"{ref.source} is not in the image cache of {self.hostname} yet")
            return self._images[imported_key(digest)]
        plain_name(field, ref.name)
        image = self._images.get(snapshot_key(ref)) if ref.namespace else None
        image = image or self._images.get(ref.name)
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

    def _overlay(self, ref: ImageRef, field: str, now: float) -> Disk:
        """A copy-on-write disk on the image's cached base."""
        image = self._checked_image(ref, field)
        self._bases[image.sha256] = now
        return Disk(len(image.data), image.data, image.sha256, cow=True)

    def _touch(self, digests: Iterable[str], now: float) -> None:
        for digest in digests:
            self._bases[digest] = now
