"""Guest addresses from the node network's DHCP leases: a changed lease has its instance looked at, so
status.ipAddresses shows a new address within a poll interval and a look.

libvirt has no event for leases; reading them is one call for the whole node (dnsmasq's lease file,
which libvirt keeps), so the agent polls every LEASE_POLL seconds and compares.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from kubenova.driver.base import ComputeDriver, DriverError, stable_mac
from kubenova.handlers.agent.cache import ObjectCache
from kubenova.handlers.agent.translate import spec_interfaces

#: Seconds between two reads of the leases.
LEASE_POLL = 0.5


def macs_of(body: Mapping[str, Any]) -> list[str]:
    """Each interface's MAC as the spec says or the driver derives it (stable_mac), in order."""
    uid, spec = body["metadata"]["uid"], body.get("spec") or {}
    return [(i.get("macAddress") or stable_mac(uid, i["name"])).lower() for i in spec_interfaces(spec)]


class LeaseWatch:
    """Looks at an instance again when a lease of one of its MACs comes, changes or goes."""

    def __init__(self, driver: ComputeDriver, cache: ObjectCache) -> None:
        self.driver, self.cache = driver, cache
        self._last: Mapping[str, str] | None = None  # before the first poll
        self._lock = threading.Lock()

    def current(self) -> Mapping[str, str]:
        """The leases as the last poll read them; before the first (an agent that just started), read now,
        so that no status write drops an address it had."""
        with self._lock:
            last = self._last
        return self.driver.dhcp_leases() if last is None else last

    def poll(self) -> None:
        try:
            leases = self.driver.dhcp_leases(poll=True)
        except DriverError:  # libvirtd away: the node's report says so; the leases are read again next time
            return
        with self._lock:
            last, self._last = self._last or {}, leases
        changed = {mac for mac in {*leases, *last} if leases.get(mac) != last.get(mac)}
        if not changed:
            return
        for uid, body in list(self.cache.objects.items()):
            if changed.intersection(macs_of(body)):
                self.cache.look(uid)
