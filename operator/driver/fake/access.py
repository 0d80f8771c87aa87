"""What the fake host shows of a guest: its console, VNC, and the counters of its disks and interfaces."""

from __future__ import annotations

from kubenova.driver.base import (
    BlockStats,
    Diagnostics,
    DriverError,
    InterfaceDetail,
    InterfaceStats,
    Unsupported,
    VncConsole,
    VolumeNotFound,
)
from kubenova.driver.fake.disks import block_stats_of
from kubenova.driver.fake.host import VNC_BASE_PORT, VNC_HOST, FakeHost
from kubenova.driver.fake.instance import ACTIVE, disk_layout, tap_names


class FakeGuestAccess(FakeHost):
    """The contract's guest access and diagnostics."""

    # --- guest access -----------------------------------------------------------------------------

    def get_console_output(self, uuid: str) -> str:
        with self._lock:
            return self._get(uuid).guest.render(self._clock())

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

    def set_admin_password(self, uuid: str, password: str) -> None:
        with self._lock:
            self._require(self._get(uuid), *ACTIVE)
        raise Unsupported(
            "set_admin_password",
            "the guest runs no QEMU guest agent; the password on the config drive applies at first boot",
        )

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
