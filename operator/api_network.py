"""Typed views of the network parts of the custom resources (kubenova.api imports them): firewall rules,
the node's default network, and what a guest agent says of the guest's interfaces."""

from __future__ import annotations

from typing import TypedDict


class FirewallRule(TypedDict, total=False):
    protocol: str
    port: int
    endPort: int
    cidr: str


class Firewall(TypedDict, total=False):
    ingress: list[FirewallRule]


class ProviderRule(FirewallRule, total=False):
    action: str


class ProviderFirewall(TypedDict, total=False):
    ingress: list[ProviderRule]


class NodeNetworkSpec(TypedDict, total=False):
    subnet: str


class NodeNetwork(TypedDict, total=False):
    name: str
    bridge: str
    subnet: str
    gateway: str


class GuestIPAddress(TypedDict, total=False):
    address: str
    prefix: int


class GuestInterface(TypedDict, total=False):
    name: str
    macAddress: str
    ipAddresses: list[GuestIPAddress]


class GuestAgentStatus(TypedDict, total=False):
    connected: bool
    osID: str
    osName: str
    prettyName: str
    osVersion: str
    kernelRelease: str
    hostname: str
    interfaces: list[GuestInterface]
