"""The networking part of the compute contract: networks, interfaces and firewalls on one node.

A contract of its own (``ComputeDriver`` inherits it) because networking is where a node meets the rest
of the cluster: the node's default network, whose leases tell the agent each guest's address, and the two
layers of firewall Nova's contract names: the node's provider rules, which the cluster admin sets and
which always come first, and each instance's own (security group) rules.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping

from kubenova.driver.types import FirewallRule, Interface, NodeNetwork


class NetworkingContract(abc.ABC):
    """Networks, interfaces and firewalls, as Nova's ComputeDriver has them, plus the node's network."""

    @abc.abstractmethod
    def ensure_node_network(self, network: NodeNetwork) -> None:
        """Make the node's default network exist, run and start with the host, as ``network`` says.

        A network of that name with another subnet is redefined only while no guest is on it; else
        a DriverError says so (the running guests would lose their addresses).
        """

    @abc.abstractmethod
    def dhcp_leases(self, poll: bool = False) -> Mapping[str, str]:
        """MAC → IPv4 address of every lease on the node's default network that has not expired;
        ``poll`` for the one caller that asks every half second (it may have a connection of its own)."""

    @abc.abstractmethod
    def plug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        """Make sure the networks the interfaces join exist on this host; on the node's default network,
        reserve each interface's address for its MAC, so the guest keeps it across boots."""

    @abc.abstractmethod
    def unplug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        """Release what plug_vifs set up for this instance (its reserved addresses)."""

    @abc.abstractmethod
    def ensure_filtering_rules_for_instance(self, uuid: str, rules: Collection[FirewallRule]) -> None:
        """Install the instance's firewall (security group) rules: what may come in; applies at once to a
        running guest."""

    @abc.abstractmethod
    def refresh_provider_fw_rules(self, rules: Collection[FirewallRule]) -> None:
        """The node's provider rules, applied before every instance's own (a drop here always wins), to
        every instance's firewall at once."""

    @abc.abstractmethod
    def unfilter_instance(self, uuid: str) -> None:
        """Remove the instance's firewall rules."""
