"""The compute contract every node-local driver implements.

Method names follow OpenStack Nova's ``ComputeDriver`` so the code can be read
side by side with that contract; the handlers call nothing else.
"""
from __future__ import annotations

import abc
import dataclasses
import enum


class PowerState(enum.Enum):
    """Nova's power states; the values are what ``status.powerState`` shows."""

    NOSTATE = "NoState"
    RUNNING = "Running"
    BLOCKED = "Blocked"
    PAUSED = "Paused"
    SHUTDOWN = "ShuttingDown"
    SHUTOFF = "Stopped"
    CRASHED = "Crashed"
    SUSPENDED = "Suspended"


class DriverError(Exception):
    """A failure of the hypervisor layer that retrying may cure."""


class InstanceNotFound(DriverError):
    """The instance has no domain on this node."""


class InvalidInstanceSpec(DriverError):
    """The instance spec cannot work on this node; retrying will not help until it changes.

    ``field`` names the spec field so the user can be told what to fix.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclasses.dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot, with paths already resolved inside the image store."""

    kernel: str
    initrd: str | None
    cmdline: str


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """What spawn needs to know; identity comes from the Kubernetes object."""

    uuid: str
    name: str
    namespace: str
    vcpus: int
    memory_mib: int
    boot: KernelBoot


@dataclasses.dataclass(frozen=True)
class InstanceInfo:
    """Nova's get_info: state, max/used memory (KiB), vCPUs and CPU time (ns)."""

    state: PowerState
    max_mem_kib: int
    mem_kib: int
    num_cpu: int
    cpu_time_ns: int


@dataclasses.dataclass(frozen=True)
class InstanceDetail:
    """One entry of Nova's list_instances_detail, with the Kubernetes identity kept in the domain."""

    uuid: str
    namespace: str
    name: str
    state: PowerState
    vcpus: int
    memory_mib: int


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """The host CPU as compare_cpu needs it."""

    arch: str
    vendor: str
    model: str
    sockets: int
    cores: int
    threads: int
    features: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class HostStats:
    """Nova's get_available_resource / get_host_stats, reported on the ComputeNode."""

    vcpus: int
    memory_mib: int
    disk_gib: int
    disk_free_gib: int
    hypervisor_type: str
    hypervisor_version: str
    hostname: str
    cpu: CpuInfo


class ComputeDriver(abc.ABC):
    """The node-local contract: one implementation per hypervisor (libvirt, fake)."""

    @abc.abstractmethod
    def init_host(self, host: str) -> None:
        """Connect to the hypervisor; fails early if it is not reachable."""

    @abc.abstractmethod
    def list_instances(self) -> list[str]:
        """UUIDs of every instance this driver manages on the node."""

    @abc.abstractmethod
    def list_instances_detail(self) -> list[InstanceDetail]:
        """Every managed instance with its identity, state and size (for resync and host usage)."""

    @abc.abstractmethod
    def instance_exists(self, uuid: str) -> bool:
        """Whether a domain for this instance exists, running or not."""

    @abc.abstractmethod
    def get_info(self, uuid: str) -> InstanceInfo:
        """Raises InstanceNotFound when there is no domain."""

    @abc.abstractmethod
    def spawn(self, instance: InstanceSpec, power_on: bool = True) -> None:
        """Create the instance; idempotent for the same UUID, leaves nothing behind on failure."""

    @abc.abstractmethod
    def destroy(self, uuid: str) -> None:
        """Stop and remove the instance; succeeds when it is already gone."""

    @abc.abstractmethod
    def power_on(self, uuid: str) -> None:
        """Start a stopped instance; a running one is left alone."""

    @abc.abstractmethod
    def power_off(self, uuid: str) -> None:
        """Stop a running instance at once; a stopped one is left alone."""

    @abc.abstractmethod
    def get_console_output(self, uuid: str) -> str:
        """What the guest printed on its serial console."""

    @abc.abstractmethod
    def get_host_stats(self) -> HostStats:
        """Capacity and identity of this hypervisor host."""
