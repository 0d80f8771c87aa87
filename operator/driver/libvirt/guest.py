"""One domain, with the few questions the driver asks of it."""

from __future__ import annotations

import libvirt

from kubenova.driver.base import PowerState
from kubenova.driver.libvirt.config import LiveDevices
from kubenova.driver.libvirt.host import translate

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


class Guest:
    def __init__(self, domain: libvirt.virDomain) -> None:
        self.domain = domain
        self.uuid = domain.UUIDString()

    @property
    def active(self) -> bool:
        with translate("isActive", self.uuid):
            return bool(self.domain.isActive())

    def info(self) -> tuple[PowerState, int, int, int, int]:
        """libvirt's info with the state in Nova's terms: (state, max KiB, KiB, vCPUs, CPU ns)."""
        with translate("info", self.uuid):
            code, max_mem, mem, ncpu, cpu_time = self.domain.info()
            state = _STATES.get(code, PowerState.NOSTATE)
            if state is PowerState.SHUTOFF and self.domain.hasManagedSaveImage():
                state = PowerState.SUSPENDED  # memory saved on disk: Nova's suspended
        return state, max_mem, mem, ncpu, cpu_time

    def state(self) -> PowerState:
        return self.info()[0]

    def devices(self, secure: bool = False) -> LiveDevices:
        with translate("XMLDesc", self.uuid):
            return LiveDevices.parse_dom(self.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE if secure else 0))

    def live_xml(self) -> str:
        """What the domain runs with now (its definition, when it is not running)."""
        with translate("XMLDesc", self.uuid):
            return str(self.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))

    def config_xml(self) -> str:
        """The persistent definition (with secrets), as it will boot next time."""
        with translate("XMLDesc", self.uuid):
            return str(self.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))

    def config_devices(self) -> LiveDevices:
        """The devices of the persistent definition (what the next boot gets)."""
        return LiveDevices.parse_dom(self.config_xml())

    def device_flags(self) -> int:
        """Change the persistent definition, and the running guest too when it runs."""
        flags: int = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        return flags | libvirt.VIR_DOMAIN_AFFECT_LIVE if self.active else flags
