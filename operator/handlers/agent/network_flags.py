"""The agent's flags for the node's networking: its default network, which networks instances may join,
the provider firewall, and where libvirt's dnsmasq reads DHCP reservations. cli.py hands its parser here."""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(agent: argparse.ArgumentParser) -> None:
    """Add the networking flags to ``kubenova agent``."""
    agent.add_argument(
        "--libvirt-dnsmasq-dir",
        default=os.environ.get("KUBENOVA_LIBVIRT_DNSMASQ_DIR", "/var/lib/libvirt/dnsmasq"),
        help="libvirtd's dnsmasq folder (its /var/lib/libvirt/dnsmasq) as the agent sees it: the node "
        "network's DHCP reservations are files there; if its dnsmasq does not read them, they go into the "
        "network's definition, ~0.6 s each [$KUBENOVA_LIBVIRT_DNSMASQ_DIR, /var/lib/libvirt/dnsmasq]",
    )
    agent.add_argument(
        "--default-network",
        action="append",
        default=None,
        help="a libvirt network every namespace's instances may join; repeat for more [default]",
    )
    agent.add_argument(
        "--namespace-networks",
        type=namespace_networks,
        default=os.environ.get("KUBENOVA_NAMESPACE_NETWORKS", "{}"),
        help='more networks per namespace, as JSON: {"team-a": ["lab"]} [$KUBENOVA_NAMESPACE_NETWORKS]',
    )
    agent.add_argument(
        "--network-name",
        default="kubenova",
        help="the node's default network, which the agent keeps [kubenova]",
    )
    agent.add_argument("--network-bridge", default="knvm0", help="its bridge on the host [knvm0]")
    agent.add_argument(
        "--network-subnet",
        default="",
        help="its IPv4 subnet; unset: the one published before, else a free block of --network-pool",
    )
    agent.add_argument(
        "--network-pool", default="10.222.0.0/16", help="where subnets come from [10.222.0.0/16]"
    )
    agent.add_argument("--network-prefix", type=int, default=24, help="the size of a node's block [24]")
    agent.add_argument(
        "--provider-firewall",
        type=provider_firewall,
        default=os.environ.get("KUBENOVA_PROVIDER_FIREWALL", "[]"),
        help="provider rules for every instance here, as the ComputeNode's spec.firewall.ingress in JSON, "
        "unless that is set [$KUBENOVA_PROVIDER_FIREWALL]",
    )


def namespace_networks(text: str) -> dict[str, tuple[str, ...]]:
    """``{"namespace": ["network", ...]}``; anything else is refused at start, not guessed at."""
    try:
        found = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(found, dict) or not all(
        isinstance(nets, list) and all(isinstance(n, str) for n in nets) for nets in found.values()
    ):
        raise argparse.ArgumentTypeError('expected {"namespace": ["network", ...]}')
    return {str(ns): tuple(nets) for ns, nets in found.items()}


def provider_firewall(text: str) -> tuple[object, ...]:
    """A JSON list of provider rules, refused at start when it is not one."""
    from kubenova.driver.base import DriverError, check_rules
    from kubenova.handlers.agent.translate import provider_rules

    try:
        found = json.loads(text)
        rules = provider_rules({"ingress": found if isinstance(found, list) else None})
        check_rules(rules)
    except (ValueError, TypeError, AttributeError, DriverError) as exc:
        raise argparse.ArgumentTypeError(f"not a JSON list of provider rules: {exc}") from exc
    return rules
