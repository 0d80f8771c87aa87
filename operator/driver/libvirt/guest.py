"""One domain: every call the driver makes on a libvirt domain, in the contract's terms (Nova's guest.py).

The raw ``virDomain`` is private to this module; its errors leave as the contract's exceptions (see
errors.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import libvirt

from kubenova.driver.base import DriverError, GuestAgentUnavailable, PowerState, Unsupported
from kubenova.driver.checks import NO_GUEST_AGENT
from kubenova.driver.libvirt.config import METADATA_NS, GuestConfig, GuestDisk, InstanceMeta, LiveDevices
from kubenova.driver.libvirt.errors import translate

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

#: Why a shut-off domain stopped, when it was a failure rather than a shutdown or a destroy.
_FAILED = (libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, libvirt.VIR_DOMAIN_SHUTOFF_FAILED)

#: What libvirt answers a call through the guest agent when none answers: not connected, timed out, out of
#: step, or the domain has no channel for one ("not configured").
_NO_AGENT = (
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
    libvirt.VIR_ERR_AGENT_UNSYNCED,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
)
#: How long libvirt waits for the guest agent's answer to one command, in seconds; its guest-sync before
#: each command waits 5 s at most besides. A hung agent costs a caller seconds, never a worker for long
#: (libvirt's own default is to wait for ever).
AGENT_TIMEOUT = 5
#: Freezing flushes every file system's dirty data first, which a guest that writes a lot takes longer for.
FREEZE_TIMEOUT = 60


class Guest:
    def __init__(self, domain: libvirt.virDomain) -> None:
        self._domain = domain
        self.uuid: str = domain.UUIDString()

    # --- what it is ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        with translate("name", self.uuid):
            return str(self._domain.name())

    @property
    def active(self) -> bool:
        with translate("isActive", self.uuid):
            return bool(self._domain.isActive())

    def info(self) -> tuple[PowerState, int, int, int, int]:
        """libvirt's info with the state in Nova's terms: (state, max KiB, KiB, vCPUs, CPU ns)."""
        with translate("info", self.uuid):
            code, max_mem, mem, ncpu, cpu_time = self._domain.info()
            state = _STATES.get(code, PowerState.NOSTATE)
            if state is PowerState.SHUTOFF and self._domain.hasManagedSaveImage():
                state = PowerState.SUSPENDED  # memory saved on disk: Nova's suspended
            elif state is PowerState.SHUTOFF and self._domain.state()[1] in _FAILED:
                state = PowerState.CRASHED  # QEMU died, not the guest's own shutdown: runStrategy tells
        return state, max_mem, mem, ncpu, cpu_time

    def state(self) -> PowerState:
        return self.info()[0]

    def paused_on_io_error(self) -> bool:
        """Whether QEMU stopped the guest because a disk write failed (libvirt's pause reason IOERROR)."""
        with translate("state", self.uuid):
            code, reason = self._domain.state()
        return bool(code == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR)

    def instance_meta(self) -> InstanceMeta:
        """kubenova's metadata element; DriverError for a domain that has none (not ours)."""
        with translate("metadata", self.uuid):
            return InstanceMeta.parse_dom(
                self._domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
            )

    def devices(self, secure: bool = False) -> LiveDevices:
        with translate("XMLDesc", self.uuid):
            return LiveDevices.parse_dom(self._domain.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE if secure else 0))

    def live_config(self) -> GuestConfig:
        """What the domain runs with now (its definition, when it is not running), without secrets."""
        with translate("XMLDesc", self.uuid):
            return GuestConfig.parse_dom(self._domain.XMLDesc(0))

    def live_xml(self) -> str:
        """What the domain runs with now (its definition, when it is not running)."""
        with translate("XMLDesc", self.uuid):
            return str(self._domain.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))

    def migratable_xml(self) -> str:
        """What the domain runs with now, as libvirt would send it to a migration's target (no secrets)."""
        with translate("XMLDesc", self.uuid):
            return str(self._domain.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))

    def config_xml(self) -> str:
        """The persistent definition (with secrets), as it will boot next time."""
        with translate("XMLDesc", self.uuid):
            return str(self._domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))

    def config_devices(self) -> LiveDevices:
        """The devices of the persistent definition (what the next boot gets)."""
        return LiveDevices.parse_dom(self.config_xml())

    # --- power -----------------------------------------------------------------------------

    def launch(self, operation: str = "start") -> None:
        """Start the defined domain (restoring its saved memory, if it has any)."""
        with translate(operation, self.uuid):
            self._domain.create()

    def poweroff(self, operation: str = "power off") -> None:
        """Stop at once, like pulling the plug; a stopped domain stays as it is."""
        with translate(operation, self.uuid):
            if self._domain.isActive():
                self._domain.destroy()

    def shutdown(self) -> None:
        """Ask the guest to shut down (ACPI); it may ignore it."""
        with translate("shutdown", self.uuid):
            self._domain.shutdown()

    def pause(self, operation: str = "pause") -> None:
        with translate(operation, self.uuid):
            self._domain.suspend()  # libvirt calls pausing "suspend"

    def resume(self, operation: str = "unpause") -> None:
        """Let a paused domain run on."""
        with translate(operation, self.uuid):
            self._domain.resume()

    def save_memory_state(self) -> None:
        """Save the memory to disk and stop (libvirt's managed save); the next launch restores it."""
        with translate("suspend", self.uuid):
            self._domain.managedSave(0)

    def remove_saved_memory(self) -> None:
        with translate("power off", self.uuid):
            if self._domain.hasManagedSaveImage():
                self._domain.managedSaveRemove()

    def remove(self) -> None:
        """Stop and undefine, with its saved memory and snapshot metadata; a domain gone meanwhile is fine."""
        try:
            if self._domain.isActive():
                self._domain.destroy()
            self._domain.undefineFlags(
                libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            )
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise DriverError(f"cannot remove domain {self.uuid}: {exc}") from exc

    # --- devices ---------------------------------------------------------------------------

    def device_flags(self) -> int:
        """Change the persistent definition, and the running guest too when it runs."""
        flags: int = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        return flags | libvirt.VIR_DOMAIN_AFFECT_LIVE if self.active else flags

    def attach_disk(self, disk: GuestDisk) -> None:
        """Into the definition, and into the running guest when it runs."""
        with translate("attach volume", self.uuid):
            self._domain.attachDeviceFlags(disk.to_xml(), self.device_flags())

    def detach_disk_config(self, disk: GuestDisk) -> None:
        """Out of the persistent definition only."""
        with translate("detach volume (definition)", self.uuid):
            self._domain.detachDeviceFlags(disk.to_xml(), libvirt.VIR_DOMAIN_AFFECT_CONFIG)

    def detach_disk_live(self, disk: GuestDisk) -> None:
        """Ask the running guest to release the disk; one gone already, or on its way, is no error."""
        try:
            self._domain.detachDeviceFlags(disk.to_xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            if "not found" not in str(exc) and "already in the process of unplug" not in str(exc):
                raise DriverError(f"detach volume failed: {exc}") from exc

    def block_resize(self, path: str, size: int) -> None:
        """Grow a disk of the running guest to ``size`` bytes."""
        with translate("grow disk", self.uuid):
            self._domain.blockResize(path, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

    def block_info(self, path: str) -> tuple[int, int, int]:
        """(capacity, allocation, physical) of one disk in bytes: its virtual size, what is allocated of
        it, and the file's size. Works on a stopped domain too (libvirt then reads the file)."""
        with translate("blockInfo", self.uuid):
            capacity, allocation, physical = self._domain.blockInfo(path, 0)
        return int(capacity), int(allocation), int(physical)

    def block_stats(self, disk: str) -> tuple[int, ...]:
        with translate("blockStats", self.uuid):
            return tuple(int(v) for v in self._domain.blockStats(disk))

    def interface_stats(self, interface: str) -> tuple[int, ...]:
        with translate("interfaceStats", self.uuid):
            return tuple(int(v) for v in self._domain.interfaceStats(interface))

    # --- the QEMU guest agent --------------------------------------------------------------

    def require_agent(self) -> None:
        """GuestAgentUnavailable unless an agent in the guest has opened its channel: read from the domain's
        XML (libvirt learns it from QEMU), so a guest without one costs no wait."""
        channel = self.devices().agent
        if channel is None:
            raise GuestAgentUnavailable(
                "the domain was started without the guest agent's channel (defined by an older kubenova); "
                "it has one from its next boot"
            )
        if channel.state != "connected":
            raise GuestAgentUnavailable(NO_GUEST_AGENT)

    @contextlib.contextmanager
    def _agent(self, operation: str, timeout: int = AGENT_TIMEOUT) -> Iterator[None]:
        """One call through the guest agent, waited for ``timeout`` seconds at most; no answer is
        GuestAgentUnavailable, a command the agent does not offer Unsupported."""
        with translate(operation, self.uuid):
            try:
                self._domain.agentSetResponseTimeout(timeout, 0)
                yield
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in _NO_AGENT:
                    raise GuestAgentUnavailable(
                        f"{operation}: the guest agent did not answer ({exc})"
                    ) from exc
                if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_UNSUPPORTED:
                    raise Unsupported(
                        operation,
                        f"the guest's agent does not offer it (too old, or configured to refuse it): {exc}",
                    ) from exc
                raise

    def set_user_password(self, user: str, password: str) -> None:
        with self._agent("set_admin_password"):
            self._domain.setUserPassword(user, password, 0)

    def guest_info(self) -> dict[str, str]:
        """What the agent says of the guest's OS and host name (libvirt's guestInfo keys: ``os.name``,
        ``hostname``, …); a kind of information an older agent does not offer is left out."""
        found: dict[str, str] = {}
        for kind in (libvirt.VIR_DOMAIN_GUEST_INFO_OS, libvirt.VIR_DOMAIN_GUEST_INFO_HOSTNAME):
            try:
                with self._agent("guest info"):
                    answer: dict[str, Any] = self._domain.guestInfo(kind, 0)
            except Unsupported:
                continue
            found.update({str(key): str(value) for key, value in answer.items()})
        return found

    def agent_interfaces(self) -> dict[str, dict[str, Any]]:
        """The guest's own interfaces as its agent lists them: name -> ``hwaddr`` and ``addrs``."""
        with self._agent("guest interfaces"):
            answer: dict[str, dict[str, Any]] = self._domain.interfaceAddresses(
                libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, 0
            )
        return dict(answer)

    def freeze_filesystems(self) -> int:
        """Flush and freeze every file system of the guest; how many it froze."""
        with self._agent("freeze the guest's file systems", FREEZE_TIMEOUT):
            return int(self._domain.fsFreeze(None, 0))

    def thaw_filesystems(self) -> int:
        """Thaw every frozen file system of the guest (none frozen: nothing happens); how many it thawed."""
        with self._agent("thaw the guest's file systems"):
            return int(self._domain.fsThaw(None, 0))

    # --- migration -------------------------------------------------------------------------

    def migrate(self, dest_uri: str, params: dict[str, Any], flags: int) -> None:
        """Blocks until the migration job ends."""
        with translate("live migration", self.uuid):
            self._domain.migrateToURI3(dest_uri, params, flags)

    def job_stats(self, completed: bool = False) -> dict[str, Any] | None:
        """The current job's figures (or the last completed one's); None when there is no job to ask about."""
        try:
            stats = self._domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED if completed else 0)
        except libvirt.libvirtError:
            return None  # the job ended between the check and the call
        return dict(stats)

    def abort_job(self) -> None:
        with translate("abort live migration", self.uuid):
            self._domain.abortJob()

    def start_post_copy(self) -> None:
        """The running migration job goes on in post-copy; libvirt refuses it for a job started without
        VIR_MIGRATE_POSTCOPY."""
        with translate("switch the live migration to post-copy", self.uuid):
            self._domain.migrateStartPostCopy(0)
