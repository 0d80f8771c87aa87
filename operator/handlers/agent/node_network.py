"""The node's default network, agent side: which subnet it has, keeping it in libvirt, the provider
firewall, and what the ComputeNode says of both.

The subnet comes from the cluster admin's ComputeNode ``spec.network.subnet``, else the agent's
``--network-subnet``, else the one this node published before (so a restart keeps every guest's address),
else a free block of the chart's pool (``--network-pool``): the first no other ComputeNode publishes,
from a place the node's name decides; of two nodes that took the same block at once, the one whose name
sorts later moves at its next look (while no guest is on its network). Two nodes left on overlapping
subnets cannot route to each other's guests: the agent says so on its ComputeNode (NetworkReady False,
and an Event) and keeps its network, since the guests on it keep their addresses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes

from kubenova.driver.base import ComputeDriver, DriverError, FirewallRule, NodeNetwork
from kubenova.handlers.agent.translate import provider_rules
from kubenova.handlers.shared import COMPUTENODES, GROUP, VERSION, set_condition, typed

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class NetworkSettings:
    """The agent's flags for its default network (the chart's agent.network and agent.firewall)."""

    name: str = "kubenova"
    bridge: str = "knvm0"
    #: fixed by the flag: used as it is
    subnet: str = ""
    #: where a node without a fixed subnet takes a block of ``prefix`` from
    pool: str = "10.222.0.0/16"
    prefix: int = 24
    provider: tuple[FirewallRule, ...] = ()


def pick(pool: str, prefix: int, taken: list[str], node: str = "") -> str:
    """The first block of ``pool`` that overlaps none of ``taken``, looking from a place that ``node``'s
    name decides (so nodes that start together rarely try the same block); "" when the pool is full."""
    used = [ipaddress.ip_network(t, strict=False) for t in taken]
    blocks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = list(
        ipaddress.ip_network(pool).subnets(new_prefix=prefix)
    )
    start = int(hashlib.sha256(node.encode()).hexdigest()[:8], 16) % len(blocks) if node else 0
    for block in blocks[start:] + blocks[:start]:
        if not any(block.overlaps(u) for u in used):
            return str(block)
    return ""


class NetworkKeeper:
    """Keeps the node's default network and provider rules as the ComputeNode's spec and the flags say."""

    def __init__(
        self,
        node: str,
        driver: ComputeDriver,
        custom: kubernetes.client.CustomObjectsApi,
        settings: NetworkSettings,
        warn: Callable[[Mapping[str, Any], str, str], None],
    ) -> None:
        self.node, self.driver, self.custom, self.settings, self.warn = node, driver, custom, settings, warn
        self.network: NodeNetwork | None = None
        self.problem = ""
        self._provider: tuple[FirewallRule, ...] | None = None

    def _others(self) -> dict[str, str]:
        """Every other node's published subnet, by node."""
        listed = typed(self.custom.list_cluster_custom_object(GROUP, VERSION, COMPUTENODES))
        return {
            item["metadata"]["name"]: subnet
            for item in listed["items"]
            if item["metadata"]["name"] != self.node
            and (subnet := ((item.get("status") or {}).get("network") or {}).get("subnet"))
        }

    def ensure(self, spec: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        """Make libvirt's network and the provider filter what ``spec`` (the ComputeNode's) and the flags
        say; what went wrong is kept for the next report (``problem``)."""
        settings = self.settings
        others = self._others()
        fixed = (spec.get("network") or {}).get("subnet") or settings.subnet
        subnet = (
            fixed
            or (self.network.subnet if self.network else "")
            or (status.get("network") or {}).get("subnet")
            or pick(settings.pool, settings.prefix, list(others.values()), self.node)
        )
        if not fixed and yields(subnet, self.node, others):
            # Two nodes that started together took the same block: the later name moves (while no guest is
            # on its network, which ensure_node_network refuses otherwise).
            subnet = pick(settings.pool, settings.prefix, list(others.values()), self.node) or subnet
        if not subnet:
            self.problem = (
                f"no free /{settings.prefix} left in the pool {settings.pool}; widen agent.network.pool"
            )
            return
        wanted = NodeNetwork(settings.name, settings.bridge, subnet)
        try:
            if wanted != self.network:
                self.driver.ensure_node_network(wanted)
                self.network = wanted
                log.info("node network %s on %s, subnet %s", wanted.name, wanted.bridge, subnet)
            rules = provider_rules(spec["firewall"]) if "firewall" in spec else settings.provider
            if rules != self._provider:
                self.driver.refresh_provider_fw_rules(rules)
                self._provider = rules
        except DriverError as exc:
            self.problem = str(exc)
            return
        self.problem = overlap(subnet, others)

    def forget(self) -> None:
        """libvirtd restarted: the next ensure makes the network and the provider rules again."""
        self.network, self._provider = None, None

    def figures(self, patch: dict[str, Any], status: Mapping[str, Any], node: Mapping[str, Any]) -> None:
        """status.network and the NetworkReady condition, for the report of ``node`` (the ComputeNode,
        which a Warning names once per problem), into ``patch``: its conditions are one list with the
        report's own."""
        net = self.network
        if net is not None:
            patch["network"] = {
                "name": net.name,
                "bridge": net.bridge,
                "subnet": net.subnet,
                "gateway": net.gateway,
            }
        reason = "SubnetOverlap" if "overlaps" in self.problem else "NetworkFailed"
        ready = not self.problem and net is not None
        message = self.problem or (
            f"{net.name} serves {net.subnet}" if net else "the node network is not made yet"
        )
        set_condition(patch, status, "NetworkReady", ready, "NetworkReady" if ready else reason, message)
        if self.problem:
            self.warn(node, reason, self.problem)


def yields(subnet: str, node: str, others: Mapping[str, str]) -> bool:
    """Whether ``subnet`` overlaps the subnet of a node whose name sorts before ``node``'s."""
    mine = ipaddress.ip_network(subnet, strict=False)
    for other, theirs in others.items():
        try:
            if other < node and mine.overlaps(ipaddress.ip_network(theirs, strict=False)):
                return True
        except ValueError:
            continue
    return False


def overlap(subnet: str, others: Mapping[str, str]) -> str:
    """What is wrong when ``subnet`` overlaps another node's; "" when it overlaps none."""
    mine = ipaddress.ip_network(subnet, strict=False)
    for node, theirs in sorted(others.items()):
        try:
            clash = mine.overlaps(ipaddress.ip_network(theirs, strict=False))
        except ValueError:
            continue
        if clash:
            return (
                f"subnet {subnet} overlaps {node}'s {theirs}: guests on the two cannot reach each other; set "
                "spec.network.subnet on one of the ComputeNodes to a free subnet"
            )
    return ""
