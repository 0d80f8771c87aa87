"""The compute contract every node-local driver implements.

Method names follow OpenStack Nova's ``ComputeDriver`` (2012.1) so the code can be read
side by side with that contract; the handlers call nothing else. Every method that has a
meaning on one node is here. A driver that cannot do something raises ``Unsupported``
with the reason; nothing is ever silently a no-op.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import hashlib
from collections.abc import Callable, Collection


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


class RebootType(enum.Enum):
    SOFT = "Soft"
    HARD = "Hard"


class HostPowerAction(enum.Enum):
    REBOOT = "Reboot"
    SHUTDOWN = "Shutdown"
    STARTUP = "Startup"


# --- exceptions ------------------------------------------------------------------------------


class DriverError(Exception):
    """A failure of the hypervisor layer that retrying may cure."""


class InstanceNotFound(DriverError):
    """The instance has no domain on this node."""


class InstanceExists(DriverError):
    """Another instance already holds this name on the node."""


class InstanceNotRunning(DriverError):
    """The operation needs a running instance."""


class InvalidInstanceSpec(DriverError):
    """The instance spec cannot work on this node; retrying will not help until it changes.

    ``field`` names the spec field so the user can be told what to fix.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ImageNotFound(InvalidInstanceSpec):
    """A named image is not in the node's store."""


class ImageChecksumMismatch(InvalidInstanceSpec):
    """An image's content does not match the checksum the spec gave."""


class InsufficientResources(InvalidInstanceSpec):
    """The host cannot give what the spec asks for (e.g. more memory than it has)."""


class InvalidCPUInfo(DriverError):
    """The CPU description handed to compare_cpu cannot be understood."""


class CPUIncompatible(DriverError):
    """This host cannot run guests made for that CPU (migration would fail)."""


class VolumeNotFound(DriverError):
    """No volume is attached at that device."""


class Unsupported(DriverError):
    """The platform cannot do this; ``reason`` says why, in words a person can act on."""

    def __init__(self, operation: str, reason: str) -> None:
        super().__init__(f"{operation} is not supported: {reason}")
        self.operation = operation
        self.reason = reason


# --- what spawn is given ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot, with paths already resolved inside the image store."""

    kernel: str
    initrd: str | None
    cmdline: str


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image in the node's store, by name, with an optional ``sha256:<hex>`` checksum."""

    name: str
    checksum: str | None = None


@dataclasses.dataclass(frozen=True)
class Interface:
    name: str
    network: str
    #: None: the driver uses ``stable_mac`` (never the hypervisor's random choice)
    mac: str | None = None
    model: str = "virtio"


def stable_mac(uuid: str, interface: str) -> str:
    """The MAC of an interface the spec gives none: derived from the instance's UID and the interface's name.

    Every host derives the same address for every definition of the instance (spawn, live and cold
    migration, resize, rescue, an agent's restart), so a live migration's target matches its source
    and a guest's network configuration keyed by MAC survives a move. Locally administered and unicast,
    with 46 bits from the digest, so it is never a vendor's address and hardly ever another instance's
    (the drivers refuse the rare clash on one host).
    """
    digest = hashlib.sha256(f"{uuid}/{interface}".encode()).digest()
    return ":".join(f"{octet:02x}" for octet in (digest[0] & 0xFC | 0x02, *digest[1:6]))


@dataclasses.dataclass(frozen=True)
class FirewallRule:
    """One security group rule: let traffic of ``protocol`` from ``cidr`` to ports ``port_min``..``port_max``
    in.

    Everything else coming in is dropped (answers to the guest's own traffic excepted);
    traffic going out is allowed.
    """

    protocol: str  # tcp, udp, icmp or all
    cidr: str = "0.0.0.0/0"
    port_min: int | None = None
    port_max: int | None = None


@dataclasses.dataclass(frozen=True)
class InjectedFile:
    path: str
    content: bytes


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """Everything spawn needs; identity (uuid = the object's UID) comes from Kubernetes."""

    uuid: str
    name: str
    namespace: str
    vcpus: int
    memory_mib: int
    boot: KernelBoot | None = None
    #: the root disk's base image (a copy-on-write overlay is made per instance)
    image: ImageRef | None = None
    root_gib: int | None = None
    #: (name, size in GiB) of empty scratch disks
    ephemeral_gib: tuple[tuple[str, int], ...] = ()
    swap_mib: int | None = None
    interfaces: tuple[Interface, ...] = ()
    user_data: str | None = None
    network_config: str | None = None
    injected_files: tuple[InjectedFile, ...] = ()
    admin_password: str | None = None
    #: the VNC password; no VNC endpoint is created without one
    vnc_password: str | None = None
    #: what the caller made this from (the agent: a digest of the spec), kept with the definition so that
    #: defined_revision tells whether the spec changed since, without reading anything else
    revision: str = ""

    def macs(self) -> tuple[str, ...]:
        """Each interface's MAC, in order: the spec's, or the stable one derived for it."""
        return tuple(i.mac or stable_mac(self.uuid, i.name) for i in self.interfaces)


def check_instance(instance: InstanceSpec, host_memory_mib: int) -> None:
    """What every driver refuses before it makes anything, so a refusal leaves nothing behind."""
    if instance.memory_mib > host_memory_mib:
        raise InsufficientResources(
            "spec.flavor.memoryMiB",
            f"{instance.memory_mib} MiB is more than the {host_memory_mib} MiB this host has",
        )
    if instance.vnc_password is not None and not 0 < len(instance.vnc_password) <= 8:
        raise InvalidInstanceSpec(
            "vncPassword",
            "VNC passwords have 1 to 8 characters (a limit of the VNC protocol's authentication)",
        )
    if instance.boot is None and instance.image is None:
        raise InvalidInstanceSpec("spec.boot", "the instance has neither a boot image nor a kernel")


def check_macs(instance: InstanceSpec, in_use: dict[str, str]) -> None:
    """Refuse a MAC that another instance on the host has (``in_use``: MAC -> who): two NICs with one
    address on a network confuse the switch and let one guest receive the other's traffic."""
    for index, (iface, mac) in enumerate(zip(instance.interfaces, instance.macs(), strict=True)):
        holder = in_use.get(mac.lower())
        if holder is not None:
            how = "is" if iface.mac else f"was derived for interface {iface.name!r} and is"
            raise InvalidInstanceSpec(
                f"spec.interfaces[{index}].macAddress",
                f"{mac} {how} already used by {holder} on this host; set another macAddress",
            )


@dataclasses.dataclass(frozen=True)
class VolumeSpec:
    """A volume to attach: from the node's volume store (created at size_gib when missing) or an image."""

    name: str
    size_gib: int | None = None
    from_image: bool = False
    bus: str = "virtio"
    read_only: bool = False


# --- what the driver reports ---------------------------------------------------------------


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
class InterfaceDetail:
    """One interface as the domain has it: its name in the spec ("" when the domain does not say), MAC,
    network."""

    name: str
    mac: str
    network: str


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
    #: measured free host memory now (Nova's host_memory_free), not capacity minus instances
    memory_free_mib: int
    disk_gib: int
    #: plain free space of the filesystem that holds the instances' files
    disk_free_gib: int
    #: free disk if every copy-on-write disk grew to its full virtual size (Nova's disk_available_least)
    disk_available_least_gib: int
    hypervisor_type: str
    hypervisor_version: str
    hostname: str
    cpu: CpuInfo


@dataclasses.dataclass(frozen=True)
class BlockStats:
    """Nova's block_stats: exactly five counters."""

    rd_req: int
    rd_bytes: int
    wr_req: int
    wr_bytes: int
    errs: int


@dataclasses.dataclass(frozen=True)
class InterfaceStats:
    """Nova's interface_stats: exactly eight counters."""

    rx_bytes: int
    rx_packets: int
    rx_errs: int
    rx_drop: int
    tx_bytes: int
    tx_packets: int
    tx_errs: int
    tx_drop: int


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """Nova's get_diagnostics, per device."""

    cpu_time_ns: int
    memory_kib: int
    disks: dict[str, BlockStats]
    interfaces: dict[str, InterfaceStats]



@dataclasses.dataclass(frozen=True)
class VncConsole:
    """Where to reach the VNC server; it always asks for ``password``."""

    host: str
    port: int
    password: str


@dataclasses.dataclass(frozen=True)
class VolumeConnector:
    """Nova's get_volume_connector."""

    ip: str
    initiator: str | None
    host: str


@dataclasses.dataclass(frozen=True)
class MigrationProgress:
    """A snapshot of a live migration job."""

    data_total: int
    data_processed: int
    data_remaining: int
    iteration: int
    expected_downtime_ms: int


ProgressCallback = Callable[[MigrationProgress], None]


@dataclasses.dataclass(frozen=True)
class MigrationOutcome:
    """What the target measured of a finished live migration; None where the hypervisor does not say."""

    elapsed_ms: int | None = None
    downtime_ms: int | None = None


class ComputeDriver(abc.ABC):
    """The node-local contract: one implementation per hypervisor (libvirt, fake)."""

    # --- host -------------------------------------------------------------------------------

    @abc.abstractmethod
    def init_host(self, host: str) -> None:
        """Connect to the hypervisor; fails early if it is not reachable."""

    def add_lifecycle_listener(self, listener: Callable[[str], None]) -> None:  # noqa: B027 (optional: no-op)
        """Call ``listener(uuid)`` whenever an instance's power state may have changed, from any thread.

        Nova's later register_event_listener; a driver without events leaves it out and the
        agent's periodic resync notices changes instead.
        """

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None:  # noqa: B027 (optional: no-op)
        """Call ``listener(False)`` when the hypervisor connection is lost and ``listener(True)`` once it is
        back.

        Not in Nova's 2012 contract: the agent needs it to say so on its ComputeNode at once, and to
        look again at every instance whose events it may have missed meanwhile. A driver without a
        connection leaves it out.
        """

    @abc.abstractmethod
    def get_available_resource(self) -> HostStats:
        """Capacity and identity of this hypervisor host."""

    def get_host_stats(self, refresh: bool = False) -> HostStats:
        """Nova's other name for the same figures."""
        return self.get_available_resource()

    @abc.abstractmethod
    def host_power_action(self, action: HostPowerAction) -> None:
        """Reboot, shut down or start the host itself."""

    @abc.abstractmethod
    def compare_cpu(self, cpu: CpuInfo) -> None:
        """Raise CPUIncompatible unless guests made for ``cpu`` can run here."""

    @abc.abstractmethod
    def get_volume_connector(self) -> VolumeConnector:
        """How storage reaches this host."""

    @abc.abstractmethod
    def manage_image_cache(self, in_use: Collection[str], grace_seconds: float) -> list[str]:
        """Remove cached base images no instance uses and unused longer than the grace; return their names."""

    # --- instances: existence and state -------------------------------------------------

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

    # --- instances: life cycle -----------------------------------------------------------

    @abc.abstractmethod
    def spawn(self, instance: InstanceSpec, power_on: bool = True) -> None:
        """Create the instance; idempotent for the same UUID, leaves nothing behind on failure."""

    @abc.abstractmethod
    def redefine(self, instance: InstanceSpec) -> None:
        """Make an existing instance's definition what ``instance`` says, for its next boot (a spec change).

        Not in Nova's 2012 contract, where a flavor changed only through a resize: a declarative spec
        changes in place. Disks grow at once (live where the instance runs); everything else applies at the
        next boot (power on, hard reboot, rescue or unrescue), and pending_changes says what waits for it.
        Refuses (InvalidInstanceSpec) what this host cannot run, leaving the definition as it was.
        """

    @abc.abstractmethod
    def defined_revision(self, uuid: str) -> str:
        """The ``revision`` of the InstanceSpec the current definition was made from ("" when it had none)."""

    @abc.abstractmethod
    def pending_changes(self, uuid: str) -> list[str]:
        """The spec fields (``spec.flavor.vcpus``, …) whose new values the running instance has not taken yet.

        Empty when it is not running: its next boot takes the definition as it is.
        """

    @abc.abstractmethod
    def destroy(self, uuid: str, destroy_disks: bool = True) -> None:
        """Stop and remove the instance and what spawn created; succeeds when it is already gone."""

    @abc.abstractmethod
    def reboot(self, uuid: str, reboot_type: RebootType, soft_timeout: float = 60.0) -> RebootType:
        """Reboot; SOFT asks the guest and falls back to HARD after ``soft_timeout``. Returns what was
        done."""

    @abc.abstractmethod
    def power_off(self, uuid: str) -> None:
        """Stop at once; a stopped instance is left alone."""

    @abc.abstractmethod
    def power_on(self, uuid: str) -> None:
        """Start (restoring a suspended instance's memory); a running one is left alone."""

    @abc.abstractmethod
    def pause(self, uuid: str) -> None:
        """Halt the vCPUs, keep the memory."""

    @abc.abstractmethod
    def unpause(self, uuid: str) -> None:
        """Let a paused instance run on; an instance that is not paused is left as it is."""

    @abc.abstractmethod
    def suspend(self, uuid: str) -> None:
        """Save the memory to disk and stop (managed save)."""

    @abc.abstractmethod
    def resume(self, uuid: str) -> None:
        """Restore a suspended instance where it stopped; an instance that is not suspended is left as it is
        (like unpause and unrescue: asking for the state an instance is already in is no error)."""

    @abc.abstractmethod
    def rescue(self, uuid: str, rescue_image: ImageRef) -> None:
        """Boot the rescue image with the instance's own disks attached after it."""

    @abc.abstractmethod
    def unrescue(self, uuid: str) -> None:
        """Boot the instance normally again; an instance that is not in rescue is left as it is."""

    @abc.abstractmethod
    def snapshot(self, uuid: str, image_name: str, progress: Callable[[int], None] | None = None) -> str:
        """Copy the root disk into a new image in the store; returns its name."""

    # --- guest access ----------------------------------------------------------------------

    @abc.abstractmethod
    def get_console_output(self, uuid: str) -> str:
        """What the guest printed on its serial console."""

    @abc.abstractmethod
    def get_vnc_console(self, uuid: str) -> VncConsole:
        """The password-protected VNC endpoint of a running instance."""

    @abc.abstractmethod
    def set_admin_password(self, uuid: str, password: str) -> None:
        """Change the guest's admin password (needs an agent in the guest)."""

    # --- diagnostics ---------------------------------------------------------------------

    @abc.abstractmethod
    def get_diagnostics(self, uuid: str) -> Diagnostics:
        """Counters of every disk and interface."""

    @abc.abstractmethod
    def list_disks(self, uuid: str) -> list[str]:
        """Guest device names of the instance's disks."""

    @abc.abstractmethod
    def list_interfaces(self, uuid: str) -> list[str]:
        """Host-side names of the instance's interfaces."""

    @abc.abstractmethod
    def list_interfaces_detail(self, uuid: str) -> list[InterfaceDetail]:
        """The instance's interfaces in guest order, as the running domain (or, stopped, its definition) has
        them.

        Not in Nova's 2012 contract: status shows each interface's MAC, which users and the guest's
        network configuration rely on.
        """

    @abc.abstractmethod
    def block_stats(self, uuid: str, disk: str) -> BlockStats:
        """Five counters of one disk."""

    @abc.abstractmethod
    def interface_stats(self, uuid: str, interface: str) -> InterfaceStats:
        """Eight counters of one interface."""

    # --- volumes -------------------------------------------------------------------------

    @abc.abstractmethod
    def attach_volume(self, uuid: str, volume: VolumeSpec, device: str) -> str:
        """Attach (hot-plug when running); returns the guest device name."""

    @abc.abstractmethod
    def detach_volume(self, uuid: str, device: str) -> None:
        """Detach; the volume's bytes stay in the store."""

    # --- networking ----------------------------------------------------------------------

    @abc.abstractmethod
    def plug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        """Make sure the networks the interfaces join exist on this host."""

    @abc.abstractmethod
    def unplug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        """Release what plug_vifs set up for this instance."""

    @abc.abstractmethod
    def ensure_filtering_rules_for_instance(self, uuid: str, rules: Collection[FirewallRule]) -> None:
        """Install the instance's firewall (security group) rules."""

    @abc.abstractmethod
    def unfilter_instance(self, uuid: str) -> None:
        """Remove the instance's firewall rules."""

    # --- migration -----------------------------------------------------------------------

    @abc.abstractmethod
    def migrate_disk_and_power_off(self, uuid: str, dest_uri: str) -> list[str]:
        """Cold migration, source side: stop the instance; returns its disk files for finish_migration."""

    @abc.abstractmethod
    def finish_migration(
        self, instance: InstanceSpec, disk_info: list[str], source_uri: str, power_on: bool = True
    ) -> None:
        """Cold migration, target side: fetch the disks from the source, define the instance with the
        (possibly new) flavor in ``instance`` and start it. The source keeps its copy until confirm."""

    @abc.abstractmethod
    def confirm_migration(self, uuid: str) -> None:
        """Cold migration, source side: the move is kept, drop the source copy."""

    @abc.abstractmethod
    def finish_revert_migration(self, uuid: str, power_on: bool = True) -> None:
        """Cold migration, source side: the move is undone, start the original again."""

    @abc.abstractmethod
    def pre_live_migration(self, instance: InstanceSpec) -> str:
        """Live migration, target side: create disks, networks and filters; return the target's definition.

        The source hands that definition to live_migration, so the instance lands on the
        target's own paths (disks, console) rather than the source's.
        """

    @abc.abstractmethod
    def live_migration(
        self,
        uuid: str,
        dest_uri: str,
        dest_definition: str,
        progress: ProgressCallback | None = None,
        block_migration: bool = True,
        max_bandwidth_mib: int | None = None,
    ) -> None:
        """Live migration, source side: move the running instance; raises on failure (it stays here).

        ``block_migration`` copies the disks' own data (no shared storage needed); on success
        the source's files are removed.
        """

    @abc.abstractmethod
    def abort_live_migration(self, uuid: str) -> None:
        """Cancel a live migration in progress; the instance keeps running here."""

    @abc.abstractmethod
    def post_live_migration_at_destination(self, uuid: str) -> MigrationOutcome:
        """Live migration, target side: the instance runs here now; returns the job's figures."""

    @abc.abstractmethod
    def rollback_live_migration_at_destination(self, uuid: str) -> None:
        """Live migration, target side: remove what pre_live_migration created (the recover step)."""

    # --- pollers -------------------------------------------------------------------------

    @abc.abstractmethod
    def poll_rebooting_instances(self, timeout: float) -> list[str]:
        """Instances whose reboot has not completed within ``timeout`` seconds."""

    @abc.abstractmethod
    def poll_rescued_instances(self, timeout: float) -> list[str]:
        """Instances in rescue for longer than ``timeout`` seconds."""
