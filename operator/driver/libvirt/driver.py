"""The compute contract on libvirt + QEMU.

Each instance is a persistent domain whose UUID is the Kubernetes object's UID, with a
folder of its own (``<instances>/<uuid>``) holding every file spawn creates: root overlay,
ephemeral and swap disks, config drive, console log, rescue state. destroy removes that
folder and nothing else: volumes and images live in their stores and are never deleted
by an instance.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Collection
from typing import Any

import libvirt

from kubenova import faults
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
from kubenova.driver.images import ImageStore
from kubenova.driver.libvirt import configdrive
from kubenova.driver.libvirt.config import (
    METADATA_NS,
    GuestConfig,
    GuestDisk,
    GuestGraphics,
    GuestInterface,
    domain_name,
    firewall_filter,
)
from kubenova.driver.libvirt.guest import Guest
from kubenova.driver.libvirt.host import Host, translate
from kubenova.driver.libvirt.imagecache import ImageCache, qemu_img

log = logging.getLogger(__name__)

ROOT, CONFIG_DRIVE, UNRESCUE, RESCUE_DISK = "disk", "disk.config", "unrescue.xml", "disk.rescue"
SWAP, EPHEMERAL, VOLUME = "disk.swap", "disk.eph.", "disk.vol."
_TARGET = re.compile(r"^(vd|sd)([a-z])$")
#: what an invalid rule is named after: the method's own argument, since no CRD carries firewall rules yet
#: (they are to come from a future spec.firewall); never a spec field that does not exist
RULES_FIELD = "rules"


def bounded(file_name: str) -> str:
    """A file name within the 255 bytes a file system allows: a longer one is cut and ends in a digest of the
    whole, so it stays unique (store names may have 253 characters, before any prefix or suffix)."""
    if len(file_name.encode()) <= 255:
        return file_name
    return f"{file_name[:230]}-{hashlib.sha256(file_name.encode()).hexdigest()[:16]}"


def partial_name(image_name: str) -> str:
    """Where a snapshot is written before it becomes ``image_name`` in the store."""
    return bounded(f".{image_name}.partial")


def _own_disk(source: str, folder: pathlib.Path) -> bool:
    """Whether a disk is one of the instance's own (root, ephemeral, swap, config drive), not an attached
    volume."""
    path = pathlib.PurePath(source)
    return path.parent == folder and not path.name.startswith(VOLUME)


def changed_fields(running: GuestConfig, defined: GuestConfig, folder: pathlib.Path) -> list[str]:
    """The spec fields in which the definition for the next boot differs from what the domain runs with."""
    fields = []
    if running.vcpus != defined.vcpus:
        fields.append("spec.flavor.vcpus")
    if running.memory_mib != defined.memory_mib:
        fields.append("spec.flavor.memoryMiB")
    if (running.kernel, running.initrd, running.cmdline) != (defined.kernel, defined.initrd, defined.cmdline):
        fields.append("spec.boot.kernel")

    def own(config: GuestConfig) -> set[str]:
        return {pathlib.PurePath(d.source).name for d in config.disks if _own_disk(d.source, folder)}

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


def _filter_name(uuid: str) -> str:
    return f"kubenova-{uuid}"


def _next_target(used: Collection[str], prefix: str = "vd") -> str:
    for letter in "abcdefghijklmnopqrstuvwxyz":
        if f"{prefix}{letter}" not in used:
            return f"{prefix}{letter}"
    raise DriverError("no free disk device name left")


class LibvirtDriver(ComputeDriver):
    def __init__(
        self,
        uri: str,
        domain_type: str,
        instances_dir: str | os.PathLike[str],
        images: ImageStore,
        volumes_dir: str | os.PathLike[str],
    ) -> None:
        self.host = Host(uri)
        self.domain_type = domain_type
        self.instances_dir = pathlib.Path(instances_dir)
        self.images = images
        self.volumes = ImageStore(volumes_dir)
        self.cache = ImageCache(images, self.instances_dir / "_base")
        self._rebooting: dict[str, float] = {}
        self._lock = threading.Lock()

    # --- helpers ---------------------------------------------------------------------------

    def _dir(self, uuid: str) -> pathlib.Path:
        return self.instances_dir / uuid

    def console_path(self, uuid: str) -> pathlib.Path:
        return self._dir(uuid) / "console.log"

    def _guest(self, uuid: str) -> Guest:
        return Guest(self.host.lookup(uuid))

    def _running(self, uuid: str, operation: str) -> Guest:
        guest = self._guest(uuid)
        if not guest.active:
            raise InstanceNotRunning(f"{operation}: the instance is not running")
        return guest

    # --- host ------------------------------------------------------------------------------

    def init_host(self, host: str) -> None:
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        conn = self.host.get_connection()
        log.info("connected to %s (libvirt %s) as node %s", self.host.uri, conn.getLibVersion(), host)

    def add_lifecycle_listener(self, listener: Callable[[str], None]) -> None:
        self.host.add_lifecycle_listener(lambda uuid, _event, _detail: listener(uuid))

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None:
        self.host.add_connection_listener(listener)

    def get_available_resource(self) -> HostStats:
        conn = self.host.get_connection()
        arch, _, cpus, *_ = conn.getInfo()
        memory_mib = self._host_memory_mib()
        cpu = ET.fromstring(conn.getCapabilities()).find("host/cpu")
        if cpu is None:
            raise DriverError("libvirt's capabilities describe no host CPU")
        topology = cpu.find("topology")
        fs = os.statvfs(self.instances_dir)
        free = fs.f_bavail * fs.f_frsize
        version = conn.getVersion()
        return HostStats(
            vcpus=cpus,
            memory_mib=memory_mib,
            memory_free_mib=self._host_free_memory_mib(),
            disk_gib=fs.f_blocks * fs.f_frsize // 2**30,
            disk_free_gib=free // 2**30,
            disk_available_least_gib=(free - self._disk_over_commit()) // 2**30,
            hypervisor_type=conn.getType(),
            hypervisor_version=f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}",
            hostname=socket.gethostname(),
            cpu=CpuInfo(
                arch=cpu.findtext("arch", arch),
                vendor=cpu.findtext("vendor", ""),
                model=cpu.findtext("model", ""),
                sockets=int(topology.get("sockets", 1)) if topology is not None else 1,
                cores=int(topology.get("cores", 1)) if topology is not None else 1,
                threads=int(topology.get("threads", 1)) if topology is not None else 1,
                features=tuple(f.get("name", "") for f in cpu.findall("feature")),
            ),
        )

    def _host_memory_mib(self) -> int:
        # getInfo sums NUMA cells, which can miss hot-added memory; the host-wide total does not.
        return (
            int(self.host.get_connection().getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)["total"])
            // 1024
        )

    def _host_free_memory_mib(self) -> int:
        """Memory the host can give now: free plus what the kernel reclaims on demand (buffers, page cache).

        The same figure as Nova's libvirt driver (total minus used, used being total - free - buffers -
        cached from /proc/meminfo), read through libvirtd so it is the hypervisor host's even when remote.
        getFreeMemory() (MemFree alone) would count a warm page cache as used and starve placement.
        """
        stats = self.host.get_connection().getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
        free = int(stats.get("free", 0)) + int(stats.get("buffers", 0)) + int(stats.get("cached", 0))
        return min(free, int(stats["total"])) // 1024

    def _disk_over_commit(self) -> int:
        """Bytes the instances' disks may still claim on this host's instance file system (Nova's
        disk_over_committed_size_total): for every disk file of every domain, running or stopped, that
        lives under the instances folder, its virtual size minus what it has allocated. Copy-on-write
        overlays and sparse files count; attached store volumes live elsewhere and do not."""
        total = 0
        for dom in self.host.get_connection().listAllDomains():
            try:
                guest = Guest(dom)
                for disk in guest.devices().disks:  # a stopped domain's: its definition
                    if not disk.source or not pathlib.PurePath(disk.source).is_relative_to(
                        self.instances_dir
                    ):
                        continue
                    capacity, allocation, _physical = dom.blockInfo(disk.source, 0)
                    total += max(0, int(capacity) - int(allocation))
            except (libvirt.libvirtError, DriverError):
                continue  # gone meanwhile, or a disk file missing: nothing it can claim
        return total

    def host_power_action(self, action: HostPowerAction) -> None:
        raise Unsupported(
            "host_power_action",
            "kubenova does not power hosts on or off (Nova's libvirt driver "
            "did not either); use the node's own management",
        )

    def compare_cpu(self, cpu: CpuInfo) -> None:
        if not cpu.arch or not cpu.model:
            raise InvalidCPUInfo("the CPU description needs an arch and a model")
        el = ET.Element("cpu")
        ET.SubElement(el, "arch").text = cpu.arch
        ET.SubElement(el, "model").text = cpu.model
        if cpu.vendor:
            ET.SubElement(el, "vendor").text = cpu.vendor
        ET.SubElement(
            el, "topology", sockets=str(cpu.sockets), cores=str(cpu.cores), threads=str(cpu.threads)
        )
        for feature in cpu.features:
            ET.SubElement(el, "feature", policy="require", name=feature)
        try:
            result = self.host.get_connection().compareCPU(ET.tostring(el, encoding="unicode"), 0)
        except libvirt.libvirtError as exc:
            raise InvalidCPUInfo(f"libvirt cannot read that CPU description: {exc}") from exc
        if result == libvirt.VIR_CPU_COMPARE_INCOMPATIBLE:
            raise CPUIncompatible(
                f"this host cannot run guests made for a {cpu.vendor} {cpu.model} "
                f"with features {', '.join(cpu.features) or '(none)'}"
            )

    def get_volume_connector(self) -> VolumeConnector:
        initiator = None
        iscsi = pathlib.Path("/etc/iscsi/initiatorname.iscsi")
        if iscsi.exists():
            for line in iscsi.read_text().splitlines():
                if line.startswith("InitiatorName="):
                    initiator = line.split("=", 1)[1].strip()
        hostname = socket.gethostname()
        try:
            ip = socket.gethostbyname(hostname)
        except OSError:
            ip = "127.0.0.1"
        return VolumeConnector(ip=ip, initiator=initiator, host=hostname)

    def manage_image_cache(self, in_use: Collection[str], grace_seconds: float) -> list[str]:
        used = set()
        for overlay in self.instances_dir.glob("*/disk*"):
            try:
                backing = json.loads(qemu_img("info", "-U", "--output=json", str(overlay))).get(
                    "backing-filename"
                )
            except DriverError:
                continue
            if backing:
                used.add(pathlib.Path(backing).name)
        for name in in_use:
            try:
                used.add(self.cache.base(ImageRef(name), "image").name)
            except InvalidInstanceSpec:
                continue
        return self.cache.manage(used, grace_seconds)

    # --- existence and state ---------------------------------------------------------------

    def list_instances(self) -> list[str]:
        return [detail.uuid for detail in self.list_instances_detail()]

    def list_instances_detail(self) -> list[InstanceDetail]:
        details = []
        for dom in self.host.get_connection().listAllDomains():
            try:
                meta = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS))
                state, max_mem_kib, _, vcpus, _ = Guest(dom).info()
            except (libvirt.libvirtError, DriverError):
                continue  # not ours, or gone meanwhile
            details.append(
                InstanceDetail(
                    uuid=dom.UUIDString(),
                    namespace=meta.get("namespace", ""),
                    name=meta.get("name", ""),
                    state=state,
                    vcpus=vcpus,
                    memory_mib=max_mem_kib // 1024,
                )
            )
        return details

    def instance_exists(self, uuid: str) -> bool:
        try:
            self._guest(uuid)
        except InstanceNotFound:
            return False
        return True

    def get_info(self, uuid: str) -> InstanceInfo:
        return InstanceInfo(*self._guest(uuid).info())

    # --- life cycle ------------------------------------------------------------------------

    def _check_fits(self, instance: InstanceSpec) -> None:
        conn = self.host.get_connection()
        try:
            other = conn.lookupByName(domain_name(instance.namespace, instance.name))
        except libvirt.libvirtError:
            other = None
        if other is not None and other.UUIDString() != instance.uuid:
            raise InstanceExists(
                f"a domain named {other.name()} already exists with UUID {other.UUIDString()}"
            )
        check_instance(instance, self._host_memory_mib())
        if instance.interfaces:
            check_macs(instance, self._macs_in_use(instance.uuid))

    def _macs_in_use(self, uuid: str) -> dict[str, str]:
        """MAC -> "namespace/name" of every other domain on this host that has it (running or defined)."""
        used = {}
        for dom in self.host.get_connection().listAllDomains():
            try:
                if dom.UUIDString() == uuid:
                    continue
                root = ET.fromstring(dom.XMLDesc(0))
            except libvirt.libvirtError:
                continue  # gone meanwhile
            meta = root.find(f"metadata/{{{METADATA_NS}}}instance")
            owner = (
                f"{meta.get('namespace')}/{meta.get('name')}" if meta is not None else f"domain {dom.name()}"
            )
            for mac in root.findall("devices/interface/mac"):
                used[mac.get("address", "").lower()] = owner
        return used

    def _guest_config(
        self, instance: InstanceSpec, folder: pathlib.Path, current: GuestConfig | None = None
    ) -> GuestConfig:
        """Create the instance's disks in its folder and describe the domain that uses them.

        With the ``current`` definition (a spec change), attached volumes stay as they are, and the config
        drive is rewritten only when its files changed.
        """
        own: list[tuple[pathlib.Path, dict[str, Any]]] = []

        def empty(path: pathlib.Path, size: str) -> None:
            if not path.exists():  # a migrated instance brings its disks along
                qemu_img("create", "-q", "-f", "qcow2", str(path), size)
            own.append((path, {}))

        if instance.image is not None:
            if not (folder / ROOT).exists():
                base = self.cache.base(instance.image, "spec.boot.image.name")
                self.cache.overlay(base, folder / ROOT, instance.root_gib)
            own.append((folder / ROOT, {}))
        elif instance.root_gib:
            empty(folder / ROOT, f"{instance.root_gib}G")
        for name, size in instance.ephemeral_gib:
            empty(folder / f"{EPHEMERAL}{name}", f"{size}G")
        if instance.swap_mib:
            empty(folder / SWAP, f"{instance.swap_mib}M")
        drive: dict[str, str] = {}
        if cloudinit.needed(instance):
            files = cloudinit.files(instance)
            drive = {name: hashlib.sha256(data).hexdigest()[:16] for name, data in files.items()}
            if current is None or current.drive != drive or not (folder / CONFIG_DRIVE).exists():
                configdrive.write(files, folder / CONFIG_DRIVE)
            own.append((folder / CONFIG_DRIVE, {"driver_type": "raw", "read_only": True}))
        volumes = [d for d in current.disks if not _own_disk(d.source, folder)] if current else []
        used = {v.target for v in volumes}
        disks = []
        for path, kw in own:  # in guest order, around the names attached volumes hold
            target = _next_target(used)
            used.add(target)
            disks.append(GuestDisk(source=str(path), target=target, **kw))
        boot = instance.boot
        return GuestConfig(
            uuid=instance.uuid,
            name=domain_name(instance.namespace, instance.name),
            namespace=instance.namespace,
            instance_name=instance.name,
            vcpus=instance.vcpus,
            memory_mib=instance.memory_mib,
            console_path=str(folder / "console.log"),
            domain_type=self.domain_type,
            kernel=boot.kernel if boot else None,
            initrd=boot.initrd if boot else None,
            cmdline=boot.cmdline if boot else None,
            disks=disks + volumes,
            interfaces=[
                GuestInterface(
                    network=i.network, mac=mac, model=i.model, filter=_filter_name(instance.uuid), name=i.name
                )
                for i, mac in zip(instance.interfaces, instance.macs(), strict=True)
            ],
            graphics=GuestGraphics(password=instance.vnc_password) if instance.vnc_password else None,
            drive=drive,
            revision=instance.revision,
        )

    def redefine(self, instance: InstanceSpec) -> None:
        """Define the instance as the spec now says, for its next boot; disks grow at once (live when it
        runs).

        A running domain keeps what it was started with (libvirt's persistent definition is what the next
        start uses); pending_changes says what differs. In rescue, the saved original is updated, so
        unrescue boots the new definition.
        """
        guest = self._guest(instance.uuid)
        check_instance(instance, self._host_memory_mib())
        folder = self._dir(instance.uuid)
        saved = folder / UNRESCUE
        current = GuestConfig.parse_dom(saved.read_text() if saved.exists() else guest.config_xml())
        if instance.interfaces:
            check_macs(instance, self._macs_in_use(instance.uuid))
            self.plug_vifs(instance.uuid, instance.interfaces)
            try:  # the first interface of an instance that had none: its filter, with no rules yet
                self.host.get_connection().nwfilterLookupByName(_filter_name(instance.uuid))
            except libvirt.libvirtError:
                self.ensure_filtering_rules_for_instance(instance.uuid, ())
        desired = self._guest_config(instance, folder, current)
        if desired.to_xml() != current.to_xml():
            if saved.exists():
                saved.write_text(desired.to_xml())
            else:
                with translate("define", instance.uuid):
                    self.host.get_connection().defineXML(desired.to_xml())
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
            if (
                not path.exists()
                or json.loads(qemu_img("info", "-U", "--output=json", str(path)))["virtual-size"] >= size
            ):
                continue
            if str(path) in live:
                with translate("grow disk", instance.uuid):
                    guest.domain.blockResize(str(path), size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
            else:
                qemu_img("resize", "-q", str(path), str(size))

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

    def spawn(self, instance: InstanceSpec, power_on: bool = True) -> None:
        self._create(instance, power_on)

    def _create(
        self, instance: InstanceSpec, power_on: bool, fill: Callable[[pathlib.Path], None] | None = None
    ) -> None:
        """Define and start an instance whose folder ``fill`` may have stocked; on failure nothing is left."""
        if self.instance_exists(instance.uuid):  # a retry: the same object, never a second domain
            if power_on:
                self.power_on(instance.uuid)
            return
        self._check_fits(instance)
        self.plug_vifs(instance.uuid, instance.interfaces)
        folder = self._dir(instance.uuid)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            if fill:
                fill(folder)
            if instance.interfaces:  # in place before the first packet: no rules yet means nothing gets in
                self.ensure_filtering_rules_for_instance(instance.uuid, ())
            config = self._guest_config(instance, folder)
            with translate("define", instance.uuid):
                dom = self.host.get_connection().defineXML(config.to_xml())
            faults.point("spawn.defined")
            if power_on:
                with translate("start", instance.uuid):
                    dom.create()
        except BaseException:
            self.destroy(instance.uuid)  # a failed spawn leaves nothing behind
            raise

    def destroy(self, uuid: str, destroy_disks: bool = True) -> None:
        try:
            guest = self._guest(uuid)
        except InstanceNotFound:
            guest = None
        if guest is not None:
            try:
                if guest.domain.isActive():
                    guest.domain.destroy()
                guest.domain.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                    | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                )
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise DriverError(f"cannot remove domain {uuid}: {exc}") from exc
        self.unfilter_instance(uuid)
        if destroy_disks:
            shutil.rmtree(self._dir(uuid), ignore_errors=True)

    def reboot(self, uuid: str, reboot_type: RebootType, soft_timeout: float = 60.0) -> RebootType:
        guest = self._running(uuid, "reboot")
        with self._lock:
            self._rebooting[uuid] = time.monotonic()
        try:
            if reboot_type is RebootType.SOFT:
                with translate("shutdown", uuid):
                    guest.domain.shutdown()
                deadline = time.monotonic() + soft_timeout
                while time.monotonic() < deadline:
                    if not guest.active:
                        with translate("start", uuid):
                            guest.domain.create()
                        return RebootType.SOFT
                    time.sleep(0.2)
                log.info("%s ignored the ACPI shutdown for %.0fs; rebooting hard", uuid, soft_timeout)
            with translate("hard reboot", uuid):
                if guest.domain.isActive():
                    guest.domain.destroy()
                guest.domain.create()
            return RebootType.HARD
        finally:
            with self._lock:
                self._rebooting.pop(uuid, None)

    def power_off(self, uuid: str) -> None:
        guest = self._guest(uuid)
        with translate("power off", uuid):
            if guest.domain.isActive():
                guest.domain.destroy()
            elif guest.domain.hasManagedSaveImage():
                guest.domain.managedSaveRemove()  # stopped means stopped: drop the saved memory

    def power_on(self, uuid: str) -> None:
        guest = self._guest(uuid)
        state = guest.state()
        with translate("power on", uuid):
            if state is PowerState.PAUSED:
                guest.domain.resume()
            elif not guest.active:
                guest.domain.create()  # restores the managed save of a suspended instance

    def pause(self, uuid: str) -> None:
        guest = self._running(uuid, "pause")
        with translate("pause", uuid):
            if guest.state() is not PowerState.PAUSED:
                guest.domain.suspend()  # libvirt calls pausing "suspend"

    def unpause(self, uuid: str) -> None:
        guest = self._guest(uuid)
        with translate("unpause", uuid):
            if guest.state() is PowerState.PAUSED:
                guest.domain.resume()

    def suspend(self, uuid: str) -> None:
        guest = self._running(uuid, "suspend")
        with translate("suspend", uuid):
            guest.domain.managedSave(0)

    def resume(self, uuid: str) -> None:
        """Restore the saved memory; an instance that is not suspended is left as it is."""
        guest = self._guest(uuid)
        if guest.state() is PowerState.SUSPENDED:
            with translate("resume", uuid):
                guest.domain.create()

    def rescue(self, uuid: str, rescue_image: ImageRef) -> None:
        guest = self._guest(uuid)
        folder = self._dir(uuid)
        if (folder / UNRESCUE).exists():
            return  # already in rescue
        original = guest.config_xml()
        base = self.cache.base(rescue_image, "spec.rescue.image")
        self.cache.overlay(base, folder / RESCUE_DISK)
        root = ET.fromstring(original)
        os_el = root.find("os")
        if os_el is None:
            raise DriverError("the domain definition has no <os>")
        for tag in ("kernel", "initrd", "cmdline", "boot"):
            for el in os_el.findall(tag):
                os_el.remove(el)
        ET.SubElement(os_el, "boot", dev="hd")
        devices = root.find("devices")
        assert devices is not None
        for target in devices.findall("disk/target"):
            match = _TARGET.match(target.get("dev", ""))
            if match:  # make room for the rescue disk in front
                target.set("dev", match.group(1) + chr(ord(match.group(2)) + 1))
        for disk in devices.findall("disk"):
            address = disk.find("address")
            if address is not None:
                disk.remove(address)
        devices.insert(0, GuestDisk(source=str(folder / RESCUE_DISK), target="vda").format_dom())
        (folder / UNRESCUE).write_text(original)
        with translate("rescue", uuid):
            if guest.domain.isActive():
                guest.domain.destroy()
            self.host.get_connection().defineXML(ET.tostring(root, encoding="unicode"))
            guest.domain.create()

    def unrescue(self, uuid: str) -> None:
        guest = self._guest(uuid)
        folder = self._dir(uuid)
        if not (folder / UNRESCUE).exists():
            return
        with translate("unrescue", uuid):
            if guest.domain.isActive():
                guest.domain.destroy()
            self.host.get_connection().defineXML((folder / UNRESCUE).read_text())
            guest.domain.create()
        (folder / UNRESCUE).unlink()
        (folder / RESCUE_DISK).unlink(missing_ok=True)

    def snapshot(self, uuid: str, image_name: str, progress: Callable[[int], None] | None = None) -> str:
        guest = self._guest(uuid)
        root = self._dir(uuid) / ROOT
        if not root.exists():
            raise Unsupported(
                "snapshot", "the instance has no root disk (direct kernel boot without spec.rootDisk)"
            )
        field = "spec.actions.snapshot.imageName"
        dest = self.images.path(field, image_name)
        if dest.exists() or dest.is_symlink():
            raise InvalidInstanceSpec(field, f"image {image_name!r} already exists in the image store")
        tmp = dest.with_name(partial_name(image_name))
        tmp.unlink(
            missing_ok=True
        )  # an interrupted snapshot's, or a link someone left: never written through
        paused = guest.state() is PowerState.RUNNING
        if paused:  # a consistent copy: no guest writes while it is made
            with translate("pause for snapshot", uuid):
                guest.domain.suspend()
        try:
            proc = subprocess.Popen(
                ["qemu-img", "convert", "-U", "-p", "-O", "qcow2", str(root), str(tmp)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            for chunk in iter(lambda: proc.stdout.read(32), ""):  # type: ignore[union-attr]
                for percent in re.findall(r"\((\d+)\.\d+/100%\)", chunk):
                    if progress:
                        progress(int(percent))
            if proc.wait() != 0:
                raise DriverError(
                    f"qemu-img convert failed: {proc.stderr.read().strip() if proc.stderr else ''}"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
            if paused:
                with translate("resume after snapshot", uuid):
                    guest.domain.resume()
        if progress:
            progress(100)
        return image_name

    # --- guest access ----------------------------------------------------------------------

    def get_console_output(self, uuid: str) -> str:
        self._guest(uuid)
        try:
            return self.console_path(uuid).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def get_vnc_console(self, uuid: str) -> VncConsole:
        graphics = self._running(uuid, "get_vnc_console").devices(secure=True).graphics
        if graphics is None:
            raise Unsupported(
                "get_vnc_console", "the instance was created without a VNC password, so it has no VNC server"
            )
        if graphics.port is None:
            raise DriverError("the VNC server has no port yet")
        return VncConsole(host=graphics.listen, port=graphics.port, password=graphics.password)

    def set_admin_password(self, uuid: str, password: str) -> None:
        guest = self._running(uuid, "set_admin_password")
        try:
            guest.domain.setUserPassword("root", password, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (
                libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
                libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
                libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
            ):
                raise Unsupported(
                    "set_admin_password",
                    "the guest runs no QEMU guest agent; the password on the "
                    "config drive applies at first boot",
                ) from exc
            raise DriverError(f"set_admin_password failed: {exc}") from exc

    # --- diagnostics -----------------------------------------------------------------------

    def list_disks(self, uuid: str) -> list[str]:
        return [d.target for d in self._guest(uuid).devices().disks]

    def list_interfaces(self, uuid: str) -> list[str]:
        return [i.target for i in self._guest(uuid).devices().interfaces if i.target]

    def list_interfaces_detail(self, uuid: str) -> list[InterfaceDetail]:
        return [
            InterfaceDetail(name=i.name, mac=i.mac or "", network=i.network)
            for i in self._guest(uuid).devices().interfaces
        ]

    def block_stats(self, uuid: str, disk: str) -> BlockStats:
        guest = self._running(uuid, "block_stats")
        with translate("blockStats", uuid):
            return BlockStats(*(int(v) for v in guest.domain.blockStats(disk)))

    def interface_stats(self, uuid: str, interface: str) -> InterfaceStats:
        guest = self._running(uuid, "interface_stats")
        with translate("interfaceStats", uuid):
            return InterfaceStats(*(int(v) for v in guest.domain.interfaceStats(interface)))

    def get_diagnostics(self, uuid: str) -> Diagnostics:
        info = self.get_info(uuid)
        return Diagnostics(
            cpu_time_ns=info.cpu_time_ns,
            memory_kib=info.mem_kib,
            disks={d: self.block_stats(uuid, d) for d in self.list_disks(uuid)},
            interfaces={i: self.interface_stats(uuid, i) for i in self.list_interfaces(uuid)},
        )

    # --- volumes ---------------------------------------------------------------------------

    def attach_volume(self, uuid: str, volume: VolumeSpec, device: str) -> str:
        guest = self._guest(uuid)
        used = [d.target for d in guest.devices().disks]
        if volume.from_image:
            base = self.cache.base(ImageRef(volume.name), "spec.image.name")
            path = self._dir(uuid) / bounded(f"{VOLUME}{volume.name}")
            if not path.exists():
                self.cache.overlay(base, path)
            fmt = "qcow2"
        else:
            path = self.volumes.path("spec.volume.name", volume.name)
            if not path.exists():
                if not volume.size_gib:
                    raise InvalidInstanceSpec(
                        "spec.volume.sizeGiB",
                        f"volume {volume.name!r} does not exist; give a size to create it",
                    )
                self.volumes.root.mkdir(parents=True, exist_ok=True)
                with open(path, "xb") as f:
                    f.truncate(volume.size_gib * 2**30)
            fmt = "raw"
        disks = guest.devices().disks
        for existing in disks:
            if existing.source == str(path) and device in ("", existing.target):
                return existing.target  # already attached: a retry (the agent may have died before saying so)
        target = device or _next_target(used, "vd" if volume.bus == "virtio" else "sd")
        if target in used:
            existing = next(d for d in disks if d.target == target)
            raise InvalidInstanceSpec("spec.device.name", f"{target} is already used by {existing.source}")
        disk = GuestDisk(
            source=str(path),
            target=target,
            driver_type=fmt,
            bus=volume.bus,
            read_only=volume.read_only,
            serial=volume.name[:20],
        )
        with translate("attach volume", uuid):
            guest.domain.attachDeviceFlags(
                ET.tostring(disk.format_dom(), encoding="unicode"), guest.device_flags()
            )
        return target

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
        xml = ET.tostring(disk.format_dom(), encoding="unicode")
        if any(d.target == device for d in config.disks):
            with translate("detach volume (definition)", uuid):
                guest.domain.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        deadline = time.monotonic() + timeout
        while guest.active and any(d.target == device for d in guest.devices().disks):
            if time.monotonic() > deadline:
                raise DriverError(
                    f"the guest did not release {device} within {timeout:.0f}s; it is removed from "
                    "the definition, so it is gone after the next power off at the latest"
                )
            try:
                guest.domain.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                if "not found" not in str(exc) and "already in the process of unplug" not in str(exc):
                    raise DriverError(f"detach volume failed: {exc}") from exc
            end = min(deadline, time.monotonic() + 5)  # the guest acknowledges a hot unplug in its own time
            while time.monotonic() < end and any(d.target == device for d in guest.devices().disks):
                time.sleep(0.2)

    # --- networking ------------------------------------------------------------------------

    def plug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        conn = self.host.get_connection()
        for index, iface in enumerate(interfaces):
            try:
                network = conn.networkLookupByName(iface.network)
            except libvirt.libvirtError as exc:
                raise InvalidInstanceSpec(
                    f"spec.interfaces[{index}].network",
                    f"this node has no libvirt network named {iface.network!r}",
                ) from exc
            with translate("start network"):
                if not network.isActive():
                    network.create()

    def unplug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        """Nothing to release: libvirt removes an instance's taps when its domain stops, and the
        networks plug_vifs started serve other instances too."""

    def ensure_filtering_rules_for_instance(self, uuid: str, rules: Collection[FirewallRule]) -> None:
        """(Re)define the instance's nwfilter; libvirt applies a redefinition to running interfaces at
        once."""
        for index, rule in enumerate(rules):
            field = f"{RULES_FIELD}[{index}]"
            if rule.protocol not in ("tcp", "udp", "icmp", "all"):
                raise InvalidInstanceSpec(f"{field}.protocol", f"unknown protocol {rule.protocol!r}")
            try:
                ipaddress.ip_network(rule.cidr)
            except ValueError as exc:
                raise InvalidInstanceSpec(f"{field}.cidr", f"{rule.cidr!r} is not an IPv4 network") from exc
        xml = firewall_filter(
            _filter_name(uuid), uuid, [(r.protocol, r.cidr, r.port_min, r.port_max) for r in rules]
        )
        with translate("define nwfilter", uuid):
            self.host.get_connection().nwfilterDefineXML(xml)

    def unfilter_instance(self, uuid: str) -> None:
        conn = self.host.get_connection()
        try:
            nwfilter = conn.nwfilterLookupByName(_filter_name(uuid))
        except libvirt.libvirtError:
            return  # no filter: nothing to remove
        with translate("undefine nwfilter", uuid):
            nwfilter.undefine()

    # --- migration -------------------------------------------------------------------------

    def migrate_disk_and_power_off(self, uuid: str, dest_uri: str) -> list[str]:
        """Stop the instance; its folder stays as it is for the target to fetch (the config drive is remade
        there)."""
        self.power_off(uuid)
        return sorted(
            str(p) for p in self._dir(uuid).glob("disk*") if p.name not in (CONFIG_DRIVE, RESCUE_DISK)
        )

    def finish_migration(
        self, instance: InstanceSpec, disk_info: list[str], source_uri: str, power_on: bool = True
    ) -> None:
        """Fetch each disk from the source's libvirtd as a storage-volume download, then define and start."""

        def fill(folder: pathlib.Path) -> None:
            self._fetch_disks(instance.uuid, disk_info, source_uri, folder)
            root = folder / ROOT
            if instance.image is not None and root.exists():  # lean on this host's own copy of the base
                base = self.cache.base(instance.image, "spec.boot.image.name")
                fmt = json.loads(qemu_img("info", "--output=json", str(base)))["format"]
                qemu_img("rebase", "-u", "-b", str(base), "-F", fmt, str(root))
            if instance.root_gib and root.exists():
                size = json.loads(qemu_img("info", "--output=json", str(root)))["virtual-size"]
                if instance.root_gib * 2**30 > size:
                    qemu_img("resize", "-q", str(root), f"{instance.root_gib}G")

        self._create(instance, power_on, fill)

    def _fetch_disks(self, uuid: str, paths: list[str], source_uri: str, folder: pathlib.Path) -> None:
        """A transient dir pool over the source's folder makes its files downloadable volumes."""
        folders = {str(pathlib.PurePath(p).parent) for p in paths}
        if len(folders) > 1:
            raise DriverError(
                f"the source's disks are spread over {sorted(folders)}; expected one instance folder"
            )
        if not folders:
            return
        pool_xml = ET.Element("pool", type="dir")
        ET.SubElement(pool_xml, "name").text = f"kubenova-out-{uuid}"
        ET.SubElement(ET.SubElement(pool_xml, "target"), "path").text = folders.pop()
        try:
            source = libvirt.open(source_uri)
        except libvirt.libvirtError as exc:
            raise DriverError(f"cannot reach the source host at {source_uri}: {exc}") from exc
        try:
            with translate("expose the source's disks", uuid):
                pool = source.storagePoolCreateXML(ET.tostring(pool_xml, encoding="unicode"), 0)
            try:
                for name in (pathlib.PurePath(p).name for p in paths):
                    with translate(f"fetch {name}", uuid), open(folder / name, "wb") as out:
                        stream = source.newStream(0)
                        pool.storageVolLookupByName(name).download(stream, 0, 0, 0)
                        stream.recvAll(lambda _s, data, f: f.write(data), out)
                        stream.finish()
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    pool.destroy()
        finally:
            source.close()

    def confirm_migration(self, uuid: str) -> None:
        self.destroy(uuid)

    def finish_revert_migration(self, uuid: str, power_on: bool = True) -> None:
        self._guest(uuid)
        if power_on:
            self.power_on(uuid)

    def pre_live_migration(self, instance: InstanceSpec) -> str:
        """Make the instance's files here as spawn would (empty overlays the copy fills) and describe the
        domain."""
        if self.instance_exists(instance.uuid):
            raise DriverError(f"instance {instance.uuid} already has a domain on this host")
        self._check_fits(instance)
        self.plug_vifs(instance.uuid, instance.interfaces)
        folder = self._dir(instance.uuid)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            if instance.interfaces:
                self.ensure_filtering_rules_for_instance(instance.uuid, ())
            return self._guest_config(instance, folder).to_xml()
        except BaseException:
            self.rollback_live_migration_at_destination(instance.uuid)
            raise

    def live_migration(
        self,
        uuid: str,
        dest_uri: str,
        dest_definition: str,
        progress: ProgressCallback | None = None,
        block_migration: bool = True,
        max_bandwidth_mib: int | None = None,
    ) -> None:
        guest = self._running(uuid, "live_migration")
        host = urllib.parse.urlsplit(dest_uri).hostname
        if not host:
            raise InvalidInstanceSpec("targetNode", f"{dest_uri!r} names no host to migrate to")
        flags = (
            libvirt.VIR_MIGRATE_LIVE
            | libvirt.VIR_MIGRATE_PEER2PEER
            | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        )
        params: dict[str, object] = {
            libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{host}",
            libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_definition,
            libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: dest_definition,
        }
        if block_migration:  # overlays travel over NBD; the bases are already on the target
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
            params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = [
                d.target for d in guest.devices().disks if not d.read_only
            ]
        if max_bandwidth_mib:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = max_bandwidth_mib
        outcome: list[BaseException] = []

        def migrate() -> None:
            try:
                with translate("live migration", uuid):
                    guest.domain.migrateToURI3(dest_uri, params, flags)
            except BaseException as exc:  # handed to the caller's thread below
                outcome.append(exc)

        worker = threading.Thread(target=migrate, name=f"migrate-{uuid}", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
            if progress and worker.is_alive():
                try:
                    stats = guest.domain.jobStats()
                except libvirt.libvirtError:
                    continue  # the job ended between the check and the call
                if stats.get("data_total"):  # nothing to report before the job has sized its work
                    progress(
                        MigrationProgress(
                            data_total=int(stats.get("data_total", 0)),
                            data_processed=int(stats.get("data_processed", 0)),
                            data_remaining=int(stats.get("data_remaining", 0)),
                            iteration=int(stats.get("memory_iteration", 0)),
                            expected_downtime_ms=int(stats.get("downtime", 0)),
                        )
                    )
        if outcome:
            raise outcome[0]  # the instance still runs here
        self.unfilter_instance(uuid)
        shutil.rmtree(self._dir(uuid), ignore_errors=True)

    def abort_live_migration(self, uuid: str) -> None:
        guest = self._running(uuid, "abort_live_migration")
        with translate("abort live migration", uuid):
            guest.domain.abortJob()

    def post_live_migration_at_destination(self, uuid: str) -> MigrationOutcome:
        guest = self._guest(uuid)
        if guest.state() is not PowerState.RUNNING:
            raise DriverError(f"instance {uuid} arrived but is not running")
        try:  # the incoming job's figures stay on the domain here until the next job
            stats = guest.domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        except libvirt.libvirtError:
            return MigrationOutcome()

        def figure(key: str) -> int | None:
            return int(stats[key]) if key in stats else None

        return MigrationOutcome(elapsed_ms=figure("time_elapsed"), downtime_ms=figure("downtime"))

    def rollback_live_migration_at_destination(self, uuid: str) -> None:
        """Remove what pre_live_migration made; a domain that did arrive is removed too."""
        self.destroy(uuid)

    # --- pollers ---------------------------------------------------------------------------

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
