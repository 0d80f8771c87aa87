"""The values of the compute contract: what spawn and the other verbs are given, and what a driver reports.

Plain frozen dataclasses and enums, with Nova's names where Nova has them; ``kubenova.driver.base``
re-exports every one of them beside the ComputeDriver contract.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import ipaddress
from collections.abc import Callable
from typing import ClassVar


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


# --- what spawn is given ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot, with paths already resolved inside the image store."""

    kernel: str
    initrd: str | None
    cmdline: str


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image in the node's store, by name, with an optional ``sha256:<hex>`` checksum.

    The store has two tiers: the public one (``<image store>/<name>``, put there by the node's
    admin, read-only to kubenova) and each namespace's own snapshots
    (``<image store>/snapshots/<namespace>/<name>``). With a ``namespace``, the name is looked up in
    that namespace's snapshots first, then in the public tier; another namespace's are never seen.
    """

    name: str
    checksum: str | None = None
    namespace: str = ""
    #: imported rather than taken from the store: an http(s) address (``checksum`` then required) ...
    url: str | None = None
    #: ... or a digest-pinned OCI reference (containerDisk layout); ``name`` is then empty
    registry: str | None = None

    @property
    def imported(self) -> bool:
        """Whether the image comes from outside the node (the image cache) instead of its store."""
        return bool(self.url or self.registry)

    @property
    def source(self) -> str:
        """What a person recognises the image by, for messages."""
        return self.url or self.registry or self.name


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
    #: "accept" or "drop": an instance's own rules only accept; a node's provider rules may drop too
    action: str = "accept"


#: An instance's firewall when its spec says none: everything may come in, as to a pod without a
#: NetworkPolicy.
ALLOW_ALL = (FirewallRule("all"),)


@dataclasses.dataclass(frozen=True)
class NodeNetwork:
    """The node's default network: a NAT network with DHCP on ``subnet`` (an IPv4 CIDR), bridged on
    ``bridge``, that every namespace's interfaces without a network join.

    The gateway is the subnet's first address (the host's end), DHCP hands out the rest.
    """

    name: str
    bridge: str
    subnet: str

    @property
    def gateway(self) -> str:
        return str(next(ipaddress.ip_network(self.subnet).hosts()))

    @property
    def prefix(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def pool(self) -> list[str]:
        """The addresses DHCP may hand out, lowest first: every host address but the gateway."""
        return [str(a) for a in list(ipaddress.ip_network(self.subnet).hosts())[1:]]


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
    #: a root disk in a claim, not the instance's folder: (disk.img in its mount, the size to make it at)
    root_claim: tuple[str, int] | None = None
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
    #: a named guest CPU model (spec.cpu.model), exactly; None: the host's own under KVM, qemu64 under TCG
    cpu_model: str | None = None
    #: what may come in (spec.firewall); ALLOW_ALL when the spec says nothing
    firewall: tuple[FirewallRule, ...] = ALLOW_ALL
    #: a migration's target only: the attached volumes that come along, which its definition must name
    volumes: tuple[MovingVolume, ...] = ()

    def macs(self) -> tuple[str, ...]:
        """Each interface's MAC, in order: the spec's, or the stable one derived for it."""
        return tuple(i.mac or stable_mac(self.uuid, i.name) for i in self.interfaces)


@dataclasses.dataclass(frozen=True)
class VolumeSpec:
    """A volume to attach: from the node's volume store (created at size_gib when missing) or an image.

    A store volume is its namespace's (``<volume store>/<namespace>/<name>``): two namespaces never share
    bytes. A claim's volume is at ``path``, found by the agent where the kubelet mounted it for a pod.
    """

    namespace: str
    name: str
    size_gib: int | None = None
    from_image: bool = False
    bus: str = "virtio"
    read_only: bool = False
    path: str | None = None


@dataclasses.dataclass(frozen=True)
class MovingVolume:
    """An attached volume that moves with its instance: the guest device it keeps, and for a store volume its
    size, so the target can make the file the copy fills before the first byte (QEMU's mirror needs a target
    of exactly the source's size)."""

    volume: VolumeSpec
    device: str
    size_bytes: int = 0


# --- what the driver reports ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InstanceInfo:
    """Nova's get_info: state, max/used memory (KiB), vCPUs and CPU time (ns), and why a guest is paused.

    ``io_error``: PAUSED because a disk write failed and the hypervisor stopped the guest rather than hand
    the error to it (QEMU's default for a full file system, ``werror=enospc``; libvirt's pause reason
    IOERROR). Not in Nova's 2012 contract: resuming such a guest retries the write, so on a disk still
    full it stops again at once, and the agent must not resume it in a loop.
    """

    state: PowerState
    max_mem_kib: int
    mem_kib: int
    num_cpu: int
    cpu_time_ns: int
    io_error: bool = False


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
    """One interface as the domain has it: its spec name ("" if the domain does not say), MAC, network."""

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
    #: what the volume store's volumes and the namespaces' snapshots hold, rounded up, where they share the
    #: instances' file system (else 0): disk no instance's request counts, which placement must not promise
    volumes_gib: int = 0
    snapshots_gib: int = 0
    #: the named CPU models a guest of this host's domain type can be given here (spec.cpu.model)
    cpu_models: tuple[str, ...] = ()


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
class GuestAddress:
    """One IP address a guest says an interface of its has, with its prefix length."""

    address: str
    prefix: int


@dataclasses.dataclass(frozen=True)
class GuestNIC:
    """One network interface as the guest itself sees it: its own name for it, its MAC, its addresses."""

    name: str
    mac: str
    addresses: tuple[GuestAddress, ...] = ()


@dataclasses.dataclass(frozen=True)
class GuestAgentInfo:
    """What the QEMU guest agent in a running guest says about it ("" where the agent does not say).

    Not in Nova's 2012 contract. Every value is the guest's own claim: a guest can say anything, so callers
    bound what they keep and never act on it as on what the host knows.
    """

    os_id: str = ""
    os_name: str = ""
    os_pretty_name: str = ""
    os_version: str = ""
    kernel_release: str = ""
    hostname: str = ""
    interfaces: tuple[GuestNIC, ...] = ()


@dataclasses.dataclass(frozen=True)
class SnapshotResult:
    """What snapshot made: the image's name, and whether the guest's file systems were quiesced (frozen by
    its guest agent) while its disk was copied; ``reason`` says why not."""

    name: str
    consistent: bool
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class SerialConsole:
    """Where the guest's serial port is reached on this host: ``socket``, a unix socket the hypervisor
    listens on (one client at a time), and ``log``, the file that keeps everything the guest printed."""

    socket: str
    log: str


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
    #: how much auto-converge slows the guest's vCPUs now, in percent (0 when it does not)
    cpu_throttle_percent: int = 0


ProgressCallback = Callable[[MigrationProgress], None]


@dataclasses.dataclass(frozen=True)
class Convergence:
    """How a live transfer may force its end when the guest writes memory faster than the link carries it
    (a Migration's spec.convergence): pre-copy alone then never ends."""

    #: Auto-converge's first throttle and its step at each memory pass, in percent of the guest's vCPU time.
    #: QEMU's own 20 and 10 take eight passes to reach 90 %; over a capped link a pass of a busy guest takes
    #: many seconds, so a guest that writes memory fast would run into its deadline first.
    THROTTLE_INITIAL: ClassVar[int] = 40
    THROTTLE_STEP: ClassVar[int] = 20

    #: slow the guest's vCPUs a step at each memory pass until the copy keeps up (libvirt's auto-converge)
    auto_converge: bool = False
    #: allow ``live_migration_force_complete``: the guest goes on at the target, which fetches the pages it
    #: still lacks from the source; certain to end, but a failure from then on loses the guest
    post_copy: bool = False


@dataclasses.dataclass(frozen=True)
class MigrationOutcome:
    """What the target measured of a finished live migration; None where the hypervisor does not say."""

    elapsed_ms: int | None = None
    downtime_ms: int | None = None
