"""What the fake host shows of a guest: its console, VNC, its guest agent, and the counters of its disks and
interfaces."""

from __future__ import annotations

import pathlib
import shutil
import tempfile
import weakref

from kubenova.driver.base import (
    BlockStats,
    Diagnostics,
    DriverError,
    GuestAddress,
    GuestAgentInfo,
    GuestAgentUnavailable,
    GuestNIC,
    InterfaceDetail,
    InterfaceStats,
    PowerState,
    SerialConsole,
    Unsupported,
    VncConsole,
    VolumeNotFound,
)
from kubenova.driver.checks import GUEST_PAUSED, NO_GUEST_AGENT
from kubenova.driver.fake.disks import block_stats_of
from kubenova.driver.fake.host import VNC_BASE_PORT, VNC_HOST, FakeHost
from kubenova.driver.fake.instance import ACTIVE, GuestAgent, Instance, disk_layout, tap_names
from kubenova.driver.fake.serial import EchoConsole


def answering_agent(inst: Instance, operation: str) -> GuestAgent:
    """The guest's agent when it can answer now; else GuestAgentUnavailable, in the libvirt driver's words
    (its channel says whether an agent is connected; a paused or hung one times out)."""
    agent = inst.agent
    if agent is None or inst.state not in ACTIVE:
        raise GuestAgentUnavailable(NO_GUEST_AGENT)
    if inst.state is PowerState.PAUSED or agent.hung:
        raise GuestAgentUnavailable(f"{operation}: the guest agent did not answer (timed out)")
    return agent


def made_up_info(inst: Instance) -> GuestAgentInfo:
    """What a plain Linux guest's agent says: named after the instance, its interfaces as eth0, eth1, … with
    their MACs and an address each in 192.0.2.0/24 (documentation addresses), and a loopback."""
    nics = [GuestNIC("lo", "00:00:00:00:00:00", (GuestAddress("127.0.0.1", 8),))]
    nics += [
        GuestNIC(f"eth{index}", mac, (GuestAddress(f"192.0.2.{10 + index}", 24),))
        for index, mac in enumerate(inst.spec.macs())
    ]
    return GuestAgentInfo(
        os_id="fake",
        os_name="Fake Linux",
        os_pretty_name="Fake Linux 1.0",
        os_version="1.0",
        kernel_release="6.1.0-fake",
        hostname=inst.spec.name,
        interfaces=tuple(nics),
    )


class FakeGuestAccess(FakeHost):
    """The contract's guest access and diagnostics."""

    # --- guest access -----------------------------------------------------------------------------

    def get_console_output(self, uuid: str) -> str:
        with self._lock:
            return self._get(uuid).guest.render(self._clock())

    def get_serial_console(self, uuid: str) -> SerialConsole:
        """A real unix socket whose guest echoes (fake/serial.py), its log what the guest printed so far."""
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *ACTIVE)
            if self._console_dir is None:
                self._console_dir = pathlib.Path(tempfile.mkdtemp(prefix="kubenova-fake-console-"))
                weakref.finalize(self, shutil.rmtree, self._console_dir, True)
            path, log = self._console_dir / f"{uuid}.sock", self._console_dir / f"{uuid}.log"
            console = self._consoles.get(uuid)
            if console is None or console.closed:
                log.write_text(inst.guest.render(self._clock()))
                console = EchoConsole(path, log, lambda: self._active(uuid))
                self._consoles[uuid] = console
            return SerialConsole(socket=str(path), log=str(log))

    def _active(self, uuid: str) -> bool:
        with self._lock:
            inst = self._instances.get(uuid)
            return inst is not None and inst.state in ACTIVE

    def get_vnc_console(self, uuid: str) -> VncConsole:
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *ACTIVE)
            if inst.spec.vnc_password is None:
                raise Unsupported(
                    "get_vnc_console",
                    "the instance was created without a VNC password, so it has no VNC server",
                )
            return VncConsole(
                host=VNC_HOST, port=VNC_BASE_PORT + inst.vnc_index, password=inst.spec.vnc_password
            )

    def set_admin_password(self, uuid: str, password: str, user: str = "root") -> None:
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *ACTIVE)
            answering_agent(inst, "set_admin_password").passwords[user] = password

    def get_guest_agent_info(self, uuid: str) -> GuestAgentInfo:
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *ACTIVE)
            if inst.state is PowerState.PAUSED:
                raise GuestAgentUnavailable(GUEST_PAUSED)
            agent = answering_agent(inst, "guest info")
            if agent.frozen:  # qemu-ga answers nothing but a thaw while the guest is frozen
                raise DriverError("guest info failed: the guest agent is frozen and answers only a thaw")
            return agent.info or made_up_info(inst)

    def unquiesce(self, uuid: str) -> None:
        """The fake's snapshot freezes and thaws under the host's lock, so no snapshot holds a guest frozen
        while this runs."""
        with self._lock:
            inst = self._get(uuid)
            if inst.state is PowerState.RUNNING:
                answering_agent(inst, "unquiesce").frozen = False

    # --- diagnostics ------------------------------------------------------------------------------

    def get_diagnostics(self, uuid: str) -> Diagnostics:
        with self._lock:
            now = self._clock()
            inst = self._get(uuid)
            self._require(inst, *ACTIVE)
            stats = inst.guest.interface_stats(now)
            return Diagnostics(
                cpu_time_ns=self._cpu_time_ns(inst, now),
                memory_kib=inst.spec.memory_mib * 1024,
                disks={name: block_stats_of(device.counters) for name, device in disk_layout(inst)},
                interfaces={tap: stats for tap in tap_names(inst)},
            )

    def list_disks(self, uuid: str) -> list[str]:
        with self._lock:
            return [name for name, _ in disk_layout(self._get(uuid))]

    def list_interfaces(self, uuid: str) -> list[str]:
        with self._lock:
            return tap_names(self._get(uuid))

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
            self._require(inst, *ACTIVE)
            devices = dict(disk_layout(inst))
            if disk not in devices:
                raise VolumeNotFound(
                    f"instance {uuid} has no disk {disk}; it has {', '.join(devices) or 'none'}"
                )
            return block_stats_of(devices[disk].counters)

    def interface_stats(self, uuid: str, interface: str) -> InterfaceStats:
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *ACTIVE)
            taps = tap_names(inst)
            if interface not in taps:
                raise DriverError(
                    f"instance {uuid} has no interface {interface}; it has {', '.join(taps) or 'none'}"
                )
            return inst.guest.interface_stats(self._clock())
