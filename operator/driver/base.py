"""The compute contract every node-local driver implements.

Method names follow OpenStack Nova's ``ComputeDriver`` (2012.1) so the code can be read
side by side with that contract; the handlers call nothing else. Every method that has a
meaning on one node is here. A driver that cannot do something raises ``Unsupported``
with the reason; nothing is ever silently a no-op.

The values it passes and returns live in ``kubenova.driver.types``, its errors in
``kubenova.driver.errors``, the checks both drivers make in ``kubenova.driver.checks``; this module
re-exports them (``__all__``) but the image import errors, so callers import everything from here.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection

from kubenova.driver.checks import (
    check_cpu_model,
    check_handed_disks,
    check_instance,
    check_macs,
    check_rules,
)
from kubenova.driver.errors import (
    CPUIncompatible,
    DriverError,
    GuestAgentUnavailable,
    ImageChecksumMismatch,
    ImageNotFound,
    InstanceExists,
    InstanceNotFound,
    InstanceNotRunning,
    InsufficientResources,
    InvalidCPUInfo,
    InvalidInstanceSpec,
    Unsupported,
    VolumeNotFound,
)
from kubenova.driver.networking import NetworkingContract
from kubenova.driver.transfer import Credentials, Progress
from kubenova.driver.types import (
    ALLOW_ALL,
    BlockStats,
    Convergence,
    CpuInfo,
    Diagnostics,
    FirewallRule,
    GuestAddress,
    GuestAgentInfo,
    GuestNIC,
    HostPowerAction,
    HostStats,
    ImageRef,
    InjectedFile,
    InstanceDetail,
    InstanceInfo,
    InstanceSpec,
    Interface,
    InterfaceDetail,
    InterfaceStats,
    KernelBoot,
    MigrationOutcome,
    MigrationProgress,
    MovingVolume,
    NodeNetwork,
    PowerState,
    ProgressCallback,
    RebootType,
    SerialConsole,
    SnapshotResult,
    VncConsole,
    VolumeConnector,
    VolumeSpec,
    stable_mac,
)

__all__ = [
    "Credentials",
    "Progress",
    "check_rules",
    "ComputeDriver",
    "check_instance",
    "check_cpu_model",
    "check_macs",
    "check_handed_disks",
    "DriverError",
    "InstanceNotFound",
    "InstanceExists",
    "InstanceNotRunning",
    "InvalidInstanceSpec",
    "ImageNotFound",
    "ImageChecksumMismatch",
    "InsufficientResources",
    "InvalidCPUInfo",
    "CPUIncompatible",
    "VolumeNotFound",
    "GuestAgentUnavailable",
    "Unsupported",
    "PowerState",
    "RebootType",
    "HostPowerAction",
    "KernelBoot",
    "ImageRef",
    "Interface",
    "stable_mac",
    "FirewallRule",
    "ALLOW_ALL",
    "NodeNetwork",
    "InjectedFile",
    "InstanceSpec",
    "VolumeSpec",
    "MovingVolume",
    "InstanceInfo",
    "InstanceDetail",
    "InterfaceDetail",
    "CpuInfo",
    "HostStats",
    "BlockStats",
    "InterfaceStats",
    "Diagnostics",
    "SerialConsole",
    "VncConsole",
    "GuestAddress",
    "GuestNIC",
    "GuestAgentInfo",
    "SnapshotResult",
    "VolumeConnector",
    "MigrationProgress",
    "ProgressCallback",
    "Convergence",
    "MigrationOutcome",
]


class ComputeDriver(NetworkingContract):
    """The node-local contract: one implementation per hypervisor (libvirt, fake); networking is in
    NetworkingContract."""

    # --- host -------------------------------------------------------------------------------

    @abc.abstractmethod
    def init_host(self, host: str) -> None:
        """Connect to the hypervisor; fails early if it is not reachable."""

    def add_lifecycle_listener(self, listener: Callable[[str], None]) -> None:  # noqa: B027 (optional: no-op)
        """Call ``listener(uuid)`` whenever an instance's power state may have changed, from any thread
        (Nova's later register_event_listener); without events, the agent's periodic resync notices."""

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None:  # noqa: B027 (optional: no-op)
        """Call ``listener(False)`` when the hypervisor connection is lost, ``listener(True)`` once it is
        back. Not Nova's: the agent says so on its ComputeNode at once, then looks again at every instance
        whose events it may have missed. A driver without a connection leaves it out."""

    def add_guest_agent_listener(self, listener: Callable[[str], None]) -> None:  # noqa: B027 (optional: no-op)
        """Call ``listener(uuid)`` whenever the QEMU guest agent in an instance connects or goes away, from
        any thread; a driver without such events leaves it out (the agent's periodic look notices instead).
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
    def cached_image(self, image: ImageRef) -> str | None:
        """The sha256 of an imported image (url or registry) in the node's cache, else None (no network)."""

    @abc.abstractmethod
    def import_image(self, image: ImageRef, credentials: Credentials | None, progress: Progress) -> str:
        """Bring an imported image into the node's image cache, verified; return its sha256. Not Nova's (its
        spawn fetched from Glance): the agent runs it off its work queue, as it may take minutes, showing
        ``progress``; an ImageImportError names the cause and the fix."""

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
    def snapshot(
        self, uuid: str, image: ImageRef, progress: Callable[[int], None] | None = None
    ) -> SnapshotResult:
        """Copy the root disk into a new image among ``image.namespace``'s own snapshots (never the public
        tier, never a name either tier has already). A running guest whose guest agent answers has its file
        systems frozen while the disk is copied, and always thawed after; the result says whether they were.
        """

    @abc.abstractmethod
    def unquiesce(self, uuid: str) -> None:
        """Thaw the guest's file systems (Nova's later unquiesce), harmless when none is frozen: an agent
        process that died during a snapshot may have left them frozen. A guest that a snapshot of this
        process holds frozen right now is left to it."""

    # --- guest access ----------------------------------------------------------------------

    @abc.abstractmethod
    def get_console_output(self, uuid: str) -> str:
        """What the guest printed on its serial console."""

    @abc.abstractmethod
    def get_serial_console(self, uuid: str) -> SerialConsole:
        """The running instance's interactive serial console, for the agent's access server to relay (not in
        Nova's 2012 contract; its get_serial_console came later); Unsupported for a domain started before
        its serial port became a socket (it gets one at its next boot)."""

    @abc.abstractmethod
    def get_vnc_console(self, uuid: str) -> VncConsole:
        """The password-protected VNC endpoint of a running instance."""

    @abc.abstractmethod
    def set_admin_password(self, uuid: str, password: str, user: str = "root") -> None:
        """Change the password of ``user`` in the running guest through its QEMU guest agent (Nova's image
        property os_admin_user, ``root`` unless it says); GuestAgentUnavailable when no agent answers."""

    @abc.abstractmethod
    def get_guest_agent_info(self, uuid: str) -> GuestAgentInfo:
        """What the QEMU guest agent of the running instance says of the guest, asked with a short timeout;
        GuestAgentUnavailable when none answers. Not in Nova's 2012 contract: status.guestAgent."""

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

    @abc.abstractmethod
    def store_volume_size(self, volume: VolumeSpec) -> int:
        """A store volume's size in bytes (0 for an image's): a live migration's target makes its copy."""

    @abc.abstractmethod
    def drop_volume_copies(self, uuid: str) -> None:
        """Delete the store volumes a migration left here for the other node: a target undone drops its
        copies, a source whose guest left though its call failed its originals (recorded ones only)."""

    # --- migration -----------------------------------------------------------------------

    @abc.abstractmethod
    def migrate_disk_and_power_off(self, uuid: str, dest_uri: str) -> list[str]:
        """Cold migration, source side: stop the instance; returns its disk files for finish_migration."""

    @abc.abstractmethod
    def finish_migration(
        self, instance: InstanceSpec, disk_info: list[str], source_uri: str, power_on: bool = True
    ) -> None:
        """Cold migration, target side: fetch the disks from the source, define the instance with the
        (possibly new) flavor in ``instance`` and start it. The source keeps its copy until confirm.

        ``disk_info`` is refused unless ``check_handed_disks`` passes it."""

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
        convergence: Convergence | None = None,
    ) -> None:
        """Live migration, source side: move the running instance; raises on failure (it stays here, unless
        the transfer was switched to post-copy).

        ``block_migration`` copies the disks' own data (no shared storage needed); on success
        the source's files are removed. ``max_bandwidth_mib`` caps pre-copy and post-copy alike.
        """

    @abc.abstractmethod
    def abort_live_migration(self, uuid: str) -> None:
        """Cancel a live migration in progress; the instance keeps running here. Refused (DriverError) once
        the transfer is in post-copy."""

    @abc.abstractmethod
    def live_migration_force_complete(self, uuid: str) -> None:
        """Switch the transfer in progress to post-copy (it must have been started with
        ``convergence.post_copy``): the guest goes on at the target at once and the rest of its memory
        follows, each page once, so the transfer ends. Nova's name, and what its libvirt driver does when
        post-copy is permitted. The point of no return: from here no host holds the whole guest until
        the transfer ends, it cannot be aborted, and a failure loses the guest."""

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
