"""The compute contract on libvirt + QEMU: the driver, put together from its parts by role.

core.py holds what every part shares (the host, the instance folders, the steps from a spec to a
defined domain), lifecycle.py an instance's life on one host, volumes.py and network.py what plugs into
it, migration.py both migrations; this module adds the host's own verbs, the listings and what a
running guest reports. Every domain call goes through guest.py, every piece of XML through config.py,
every qemu-img run through imagecache.py.
"""

from __future__ import annotations

import logging
import os
import pathlib
import socket
from collections.abc import Callable, Collection

import libvirt

from kubenova.driver.base import (
    BlockStats,
    CPUIncompatible,
    CpuInfo,
    Credentials,
    Diagnostics,
    DriverError,
    HostPowerAction,
    HostStats,
    ImageRef,
    InstanceDetail,
    InstanceInfo,
    InstanceNotFound,
    InterfaceDetail,
    InterfaceStats,
    InvalidCPUInfo,
    InvalidInstanceSpec,
    PowerState,
    Progress,
    SerialConsole,
    Unsupported,
    VncConsole,
    VolumeConnector,
)
from kubenova.driver.images import SNAPSHOTS
from kubenova.driver.libvirt import imagecache
from kubenova.driver.libvirt.hostconfig import CPUConfig
from kubenova.driver.libvirt.lifecycle import Lifecycle
from kubenova.driver.libvirt.migration import Migration
from kubenova.driver.libvirt.network import Network
from kubenova.driver.libvirt.volumes import Volumes

log = logging.getLogger(__name__)


class LibvirtDriver(Lifecycle, Volumes, Migration, Network):
    # --- host ------------------------------------------------------------------------------

    def init_host(self, host: str) -> None:
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        conn = self.host.get_connection()
        log.info("connected to %s (libvirt %s) as node %s", self.host.uri, conn.getLibVersion(), host)

    def add_lifecycle_listener(self, listener: Callable[[str], None]) -> None:
        self.host.add_lifecycle_listener(lambda uuid, _event, _detail: listener(uuid))

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None:
        self.host.add_connection_listener(listener)

    def add_guest_agent_listener(self, listener: Callable[[str], None]) -> None:
        self.host.add_guest_agent_listener(listener)

    def get_available_resource(self) -> HostStats:
        conn = self.host.get_connection()
        cpus = conn.getInfo()[2]
        cpu = self.host.cpu()
        fs = os.statvfs(self.instances_dir)
        free = fs.f_bavail * fs.f_frsize
        version = conn.getVersion()
        return HostStats(
            vcpus=cpus,
            memory_mib=self.host.memory_mib(),
            memory_free_mib=self.host.free_memory_mib(),
            disk_gib=fs.f_blocks * fs.f_frsize // 2**30,
            disk_free_gib=free // 2**30,
            disk_available_least_gib=max(0, (free - self._disk_over_commit()) // 2**30),
            hypervisor_type=conn.getType(),
            hypervisor_version=f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}",
            hostname=socket.gethostname(),
            cpu=CpuInfo(
                arch=cpu.arch,
                vendor=cpu.vendor,
                model=cpu.model,
                sockets=cpu.sockets,
                cores=cpu.cores,
                threads=cpu.threads,
                features=cpu.features,
            ),
            volumes_gib=self._held_gib(self.volumes.root),
            snapshots_gib=self._held_gib(self.images.root / SNAPSHOTS),
            cpu_models=self._cpu_models(),
        )

    def _cpu_models(self) -> tuple[str, ...]:
        """The named CPU models guests of this driver's domain type can get here; none when libvirt cannot
        say (a KVM host whose /dev/kvm is missing): the host's other figures are still worth reporting."""
        try:
            return self.host.domain_capabilities(self.domain_type).cpu_models
        except DriverError as exc:
            log.warning("libvirt names no CPU model for %s domains here: %s", self.domain_type, exc)
            return ()

    def _held_gib(self, folder: pathlib.Path) -> int:
        """What the files under ``folder`` hold on the instances' file system, in GiB rounded up; 0 when the
        folder is on another file system, whose space no instance's disk takes.

        Allocated bytes, not sizes: a store volume is a sparse file, and its size (which the agent never
        shrinks and kubenova never deletes) would count every volume ever made in full.
        """
        try:
            if folder.stat().st_dev != self.instances_dir.stat().st_dev:
                return 0
        except OSError:  # a store that does not exist (yet) holds nothing
            return 0
        held = 0
        for parent, _, files in os.walk(folder):
            for name in files:
                try:
                    held += os.lstat(os.path.join(parent, name)).st_blocks * 512
                except OSError:  # gone meanwhile
                    continue
        return -(-held // 2**30)

    def _disk_over_commit(self) -> int:
        """Bytes the instances' disks may still claim on this host's instance file system (Nova's
        disk_over_committed_size_total): for every disk file of every domain, running or stopped, that
        lives under the instances folder, its virtual size minus what it has allocated. Copy-on-write
        overlays and sparse files count; attached store volumes live elsewhere and do not."""
        total = 0
        for guest in self.host.list_guests():
            try:
                for disk in guest.devices().disks:  # a stopped domain's: its definition
                    if not disk.source or not pathlib.PurePath(disk.source).is_relative_to(
                        self.instances_dir
                    ):
                        continue
                    capacity, allocation, _physical = guest.block_info(disk.source)
                    total += max(0, capacity - allocation)
            except DriverError:
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
        config = CPUConfig(
            arch=cpu.arch,
            model=cpu.model,
            vendor=cpu.vendor,
            sockets=cpu.sockets,
            cores=cpu.cores,
            threads=cpu.threads,
            features=tuple(cpu.features),
        )
        try:
            result = self.host.compare_cpu(config)
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

    def cached_image(self, image: ImageRef) -> str | None:
        found = self.cache.importer.cached(image)
        return found.name if found else None

    def import_image(self, image: ImageRef, credentials: Credentials | None, progress: Progress) -> str:
        return self.cache.importer.fetch(image, credentials, progress).name

    def manage_image_cache(self, in_use: Collection[str], grace_seconds: float) -> list[str]:
        used = set()
        for overlay in self.instances_dir.glob("*/disk*"):
            backing = imagecache.backing_file(overlay)
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
        for guest in self.host.list_guests():
            try:
                meta = guest.instance_meta()
                state, max_mem_kib, _, vcpus, _ = guest.info()
            except DriverError:
                continue  # not ours, or gone meanwhile
            details.append(
                InstanceDetail(
                    uuid=guest.uuid,
                    namespace=meta.namespace,
                    name=meta.name,
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
        guest = self._guest(uuid)
        state, max_mem_kib, mem_kib, vcpus, cpu_time_ns = guest.info()
        # The pause reason costs a second call, asked only of a paused domain.
        io_error = state is PowerState.PAUSED and guest.paused_on_io_error()
        return InstanceInfo(state, max_mem_kib, mem_kib, vcpus, cpu_time_ns, io_error)

    # --- guest access ----------------------------------------------------------------------

    def get_console_output(self, uuid: str) -> str:
        self._guest(uuid)
        try:
            return self.console_path(uuid).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def get_serial_console(self, uuid: str) -> SerialConsole:
        config = self._running(uuid, "get_serial_console").live_config()
        if not config.console_socket:
            raise Unsupported(
                "get_serial_console",
                "the instance was started before its serial console became a socket; it gets one at its "
                "next boot (stop and start it)",
            )
        return SerialConsole(
            socket=config.console_socket, log=config.console_path or str(self.console_path(uuid))
        )

    def get_vnc_console(self, uuid: str) -> VncConsole:
        graphics = self._running(uuid, "get_vnc_console").devices(secure=True).graphics
        if graphics is None:
            raise Unsupported(
                "get_vnc_console", "the instance was created without a VNC password, so it has no VNC server"
            )
        if graphics.port is None:
            raise DriverError("the VNC server has no port yet")
        return VncConsole(host=graphics.listen, port=graphics.port, password=graphics.password)

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
        return BlockStats(*self._running(uuid, "block_stats").block_stats(disk))

    def interface_stats(self, uuid: str, interface: str) -> InterfaceStats:
        return InterfaceStats(*self._running(uuid, "interface_stats").interface_stats(interface))

    def get_diagnostics(self, uuid: str) -> Diagnostics:
        info = self.get_info(uuid)
        return Diagnostics(
            cpu_time_ns=info.cpu_time_ns,
            memory_kib=info.mem_kib,
            disks={d: self.block_stats(uuid, d) for d in self.list_disks(uuid)},
            interfaces={i: self.interface_stats(uuid, i) for i in self.list_interfaces(uuid)},
        )
