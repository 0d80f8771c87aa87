"""The fake host's networking: plugged interfaces, firewall rules and a default network whose DHCP
"leases" are the reserved address of every running instance's interface on it."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from kubenova.driver.base import DriverError, FirewallRule, Interface, NodeNetwork, check_rules, stable_mac
from kubenova.driver.fake.host import FakeHost
from kubenova.driver.fake.instance import ACTIVE


class FakeNetwork(FakeHost):
    def vifs(self, uuid: str) -> tuple[Interface, ...]:
        """What plug_vifs set up for the instance and unplug_vifs has not released."""
        with self._lock:
            return tuple(self._vifs.get(uuid, {}).values())

    def filtering_rules(self, uuid: str) -> tuple[FirewallRule, ...]:
        """The firewall rules installed for the instance."""
        with self._lock:
            return self._rules.get(uuid, ())

    def provider_rules(self) -> tuple[FirewallRule, ...]:
        with self._lock:
            return self._provider

    def ensure_node_network(self, network: NodeNetwork) -> None:
        with self._lock:
            if self._network is not None and self._network.subnet != network.subnet:
                self._reserved.clear()
            self._network = network

    def dhcp_leases(self, poll: bool = False) -> Mapping[str, str]:
        """The reservation of each interface on the node network whose instance runs: a guest asks for
        its lease as it boots."""
        with self._lock:
            if self._network is None:
                return {}
            running = {uid for uid, inst in self._instances.items() if inst.state in ACTIVE}
            return {
                mac: self._reserved[mac]
                for uid in running
                for mac in self._node_macs(uid, self._vifs.get(uid, {}).values())
                if mac in self._reserved
            }

    def _node_macs(self, uuid: str, interfaces: Collection[Interface]) -> list[str]:
        network = self._network
        return [
            i.mac or stable_mac(uuid, i.name) for i in interfaces if network and i.network == network.name
        ]

    def plug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        """Recorded per instance, defined or not: spawn plugs its own, Nova plugs before a migration too;
        interfaces on the node network get an address each."""
        with self._lock:
            if interfaces:
                self._vifs.setdefault(uuid, {}).update((iface.name, iface) for iface in interfaces)
            macs = self._node_macs(uuid, interfaces)
            if self._network is None or not macs:
                return
            taken = set(self._reserved.values())
            free = (ip for ip in self._network.pool() if ip not in taken)
            for mac in macs:
                if mac not in self._reserved:
                    address = next(free, None)
                    if address is None:
                        raise DriverError(f"the node network {self._network.subnet} has no free address left")
                    self._reserved[mac] = address

    def unplug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        with self._lock:
            plugged = self._vifs.get(uuid, {})
            for iface in interfaces:
                plugged.pop(iface.name, None)
            for mac in self._node_macs(uuid, interfaces):
                self._reserved.pop(mac, None)
            if not plugged:
                self._vifs.pop(uuid, None)

    def ensure_filtering_rules_for_instance(self, uuid: str, rules: Collection[FirewallRule]) -> None:
        check_rules(rules)
        with self._lock:
            self._rules[uuid] = tuple(rules)

    def refresh_provider_fw_rules(self, rules: Collection[FirewallRule]) -> None:
        check_rules(rules)
        with self._lock:
            self._provider = tuple(rules)

    def unfilter_instance(self, uuid: str) -> None:
        with self._lock:
            self._rules.pop(uuid, None)
