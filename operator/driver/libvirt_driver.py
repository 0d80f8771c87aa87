"""The compute contract implemented on libvirt + QEMU."""
from __future__ import annotations

import logging
import os
import pathlib
import socket
import threading
import xml.etree.ElementTree as ET

import libvirt

from kubenova.driver.base import (
    ComputeDriver, CpuInfo, DriverError, HostStats, InstanceDetail, InstanceInfo, InstanceNotFound, InstanceSpec,
    PowerState,
)
from kubenova.driver.domain import METADATA_NS, domain_xml

log = logging.getLogger(__name__)

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: PowerState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,  # waiting on I/O is still running for users
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.SUSPENDED,
}


def _silence_libvirt(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them as exceptions instead."""


libvirt.registerErrorHandler(_silence_libvirt, None)


class LibvirtDriver(ComputeDriver):
    """Runs instances as persistent libvirt domains, one per Kubernetes object UID."""

    def __init__(self, uri: str, domain_type: str, console_dir: str | os.PathLike[str]) -> None:
        self.uri = uri
        self.domain_type = domain_type
        self.console_dir = pathlib.Path(console_dir)
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()

    @property
    def conn(self) -> libvirt.virConnect:
        """One shared connection, reopened when libvirtd went away."""
        with self._lock:
            if self._conn is None or not self._conn.isAlive():
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError as exc:
                    raise DriverError(f"cannot connect to libvirt at {self.uri}: {exc}") from exc
            return self._conn

    def _domain(self, uuid: str) -> libvirt.virDomain:
        """The one place libvirt's lookup errors become the contract's exceptions."""
        try:
            return self.conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise InstanceNotFound(uuid) from exc
            raise DriverError(f"libvirt lookup of {uuid} failed: {exc}") from exc

    def console_path(self, uuid: str) -> pathlib.Path:
        return self.console_dir / f"{uuid}.log"

    def init_host(self, host: str) -> None:
        self.console_dir.mkdir(parents=True, exist_ok=True)
        log.info("connected to %s (libvirt %s) as node %s", self.uri, self.conn.getLibVersion(), host)

    def list_instances(self) -> list[str]:
        return [detail.uuid for detail in self.list_instances_detail()]

    def list_instances_detail(self) -> list[InstanceDetail]:
        details = []
        for dom in self.conn.listAllDomains():
            try:
                meta = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS))
                state, max_mem_kib, _, vcpus, _ = dom.info()
            except libvirt.libvirtError:
                continue  # not ours, or gone meanwhile
            details.append(InstanceDetail(
                uuid=dom.UUIDString(), namespace=meta.get("namespace", ""), name=meta.get("name", ""),
                state=_STATES.get(state, PowerState.NOSTATE), vcpus=vcpus, memory_mib=max_mem_kib // 1024))
        return details

    def instance_exists(self, uuid: str) -> bool:
        try:
            self._domain(uuid)
        except InstanceNotFound:
            return False
        return True

    def get_info(self, uuid: str) -> InstanceInfo:
        state, max_mem, mem, ncpu, cpu_time = self._domain(uuid).info()
        return InstanceInfo(_STATES.get(state, PowerState.NOSTATE), max_mem, mem, ncpu, cpu_time)

    def spawn(self, instance: InstanceSpec, power_on: bool = True) -> None:
        if not self.instance_exists(instance.uuid):
            xml = domain_xml(instance, self.domain_type, str(self.console_path(instance.uuid)))
            try:
                self.conn.defineXML(xml)
            except libvirt.libvirtError as exc:
                raise DriverError(f"libvirt refused the domain definition: {exc}") from exc
        if power_on:
            try:
                self.power_on(instance.uuid)
            except DriverError:
                self.destroy(instance.uuid)  # a failed spawn leaves nothing behind
                raise

    def destroy(self, uuid: str) -> None:
        try:
            dom = self._domain(uuid)
        except InstanceNotFound:
            return
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                              | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise DriverError(f"cannot remove domain {uuid}: {exc}") from exc
        self.console_path(uuid).unlink(missing_ok=True)

    def power_on(self, uuid: str) -> None:
        dom = self._domain(uuid)
        if dom.isActive():
            return
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            raise DriverError(f"the domain did not start: {exc}") from exc

    def power_off(self, uuid: str) -> None:
        dom = self._domain(uuid)
        if not dom.isActive():
            return
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # stopped meanwhile
                raise DriverError(f"cannot stop domain {uuid}: {exc}") from exc

    def get_console_output(self, uuid: str) -> str:
        self._domain(uuid)
        try:
            return self.console_path(uuid).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def get_host_stats(self) -> HostStats:
        arch, _, cpus, *_ = self.conn.getInfo()
        # getInfo sums NUMA cells, which can miss hot-added memory; the host-wide total does not.
        memory_mib = self.conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)["total"] // 1024
        cpu = ET.fromstring(self.conn.getCapabilities()).find("host/cpu")
        topology = cpu.find("topology") if cpu is not None else None
        fs = os.statvfs(self.console_dir)
        version = self.conn.getVersion()
        return HostStats(
            vcpus=cpus, memory_mib=memory_mib,
            disk_gib=fs.f_blocks * fs.f_frsize // 2**30, disk_free_gib=fs.f_bavail * fs.f_frsize // 2**30,
            hypervisor_type=self.conn.getType(),
            hypervisor_version=f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}",
            hostname=socket.gethostname(),
            cpu=CpuInfo(
                arch=cpu.findtext("arch", arch) if cpu is not None else arch,
                vendor=cpu.findtext("vendor", "") if cpu is not None else "",
                model=cpu.findtext("model", "") if cpu is not None else "",
                sockets=int(topology.get("sockets", 1)) if topology is not None else 1,
                cores=int(topology.get("cores", 1)) if topology is not None else 1,
                threads=int(topology.get("threads", 1)) if topology is not None else 1,
                features=tuple(f.get("name", "") for f in cpu.findall("feature")) if cpu is not None else ()))
