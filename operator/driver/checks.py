"""The checks both drivers make before they act, so the two refuse the same things in the same words.

Re-exported by ``kubenova.driver.base``, where callers import them from.
"""

from __future__ import annotations

import ipaddress
import posixpath
from collections.abc import Collection

from kubenova.driver.errors import DriverError, InsufficientResources, InvalidInstanceSpec
from kubenova.driver.types import FirewallRule, InstanceSpec, PowerState

#: What both drivers say when no guest agent can answer, in the same words.
NO_GUEST_AGENT = (
    "no QEMU guest agent is connected in the guest; install and start one in the image (Debian and Ubuntu: "
    "the package qemu-guest-agent)"
)
GUEST_PAUSED = "the guest is paused, so its guest agent cannot answer"


def not_running_reason(state: PowerState) -> str:
    """Why a snapshot of a guest in ``state`` (not running) could not have its file systems frozen."""
    if state is PowerState.PAUSED:
        return GUEST_PAUSED
    return (
        f"the guest is not running ({state.value}): its disk is as the guest last left it, and kubenova "
        "stops guests at once, like pulling the plug"
    )


def check_instance(instance: InstanceSpec, host_memory_mib: int) -> None:
    """What every driver refuses before it makes anything, so a refusal leaves nothing behind."""
    if instance.memory_mib > host_memory_mib:
        raise InsufficientResources(
            "spec.flavor.memoryMiB",
            f"{instance.memory_mib} MiB is more than the {host_memory_mib} MiB this host has",
        )
    if instance.vnc_password is not None and not 0 < len(instance.vnc_password) <= 8:
        raise InvalidInstanceSpec(
            "vncPassword",
            "VNC passwords have 1 to 8 characters (a limit of the VNC protocol's authentication)",
        )
    if instance.boot is None and instance.image is None:
        raise InvalidInstanceSpec("spec.boot", "the instance has neither a boot image nor a kernel")


def check_cpu_model(instance: InstanceSpec, usable: Collection[str]) -> None:
    """Refuse a spec.cpu.model this host cannot give a guest in full (``usable``: the models it can, its
    ComputeNode's status.cpuModels), before anything is made: a guest that starts on a lesser CPU than it
    was promised fails later, in ways far from the cause. Nova's compare_cpu, asked of the spec."""
    if instance.cpu_model and instance.cpu_model not in usable:
        raise InvalidInstanceSpec(
            "spec.cpu.model",
            f"this node cannot run CPU model {instance.cpu_model!r}; name one its ComputeNode lists in "
            "status.cpuModels, or remove spec.cpu.model to get the host's own CPU (KVM) or qemu64 (TCG)",
        )


def check_macs(instance: InstanceSpec, in_use: dict[str, str]) -> None:
    """Refuse a MAC that another instance on the host has (``in_use``: MAC -> who): two NICs with one
    address on a network confuse the switch and let one guest receive the other's traffic."""
    for index, (iface, mac) in enumerate(zip(instance.interfaces, instance.macs(), strict=True)):
        holder = in_use.get(mac.lower())
        if holder is not None:
            how = "is" if iface.mac else f"was derived for interface {iface.name!r} and is"
            raise InvalidInstanceSpec(
                f"spec.interfaces[{index}].macAddress",
                f"{mac} {how} already used by {holder} on this host; set another macAddress",
            )


#: What an invalid rule is named after: the method's own argument (the agent checks spec.firewall itself,
#: and the CRD's schema before it, so a spec field is named where one is at fault).
RULES_FIELD = "rules"
PROTOCOLS = ("tcp", "udp", "icmp", "all")


def check_rules(rules: Collection[FirewallRule]) -> None:
    """Refuse a rule no firewall can express, naming it by its place, before anything is applied: a filter
    half redefined would let in less, or more, than either the old rules or the new."""
    for index, rule in enumerate(rules):
        field = f"{RULES_FIELD}[{index}]"
        if rule.protocol not in PROTOCOLS:
            raise InvalidInstanceSpec(f"{field}.protocol", f"unknown protocol {rule.protocol!r}")
        if rule.action not in ("accept", "drop"):
            raise InvalidInstanceSpec(f"{field}.action", f"unknown action {rule.action!r}: accept or drop")
        ports = [
            p for p in (rule.port_min, rule.port_max) if p is not None and rule.protocol in ("tcp", "udp")
        ]
        if any(not 1 <= p <= 65535 for p in ports) or (len(ports) == 2 and ports[0] > ports[1]):
            raise InvalidInstanceSpec(f"{field}.ports", f"ports {ports} are not a range within 1-65535")
        try:
            ipaddress.ip_network(rule.cidr)
        except ValueError as exc:
            raise InvalidInstanceSpec(f"{field}.cidr", f"{rule.cidr!r} is not an IPv4 network") from exc


def check_handed_disks(
    uuid: str, disk_info: Collection[str], volumes: Collection[tuple[str, str]] = ()
) -> None:
    """Refuse a cold migration's hand-off that names any file but the moved instance's own: the list
    travels in the Migration's status from the source, and taken as is, a forged one would make
    the target fetch any file the source's libvirtd can read (another tenant's disk, a host secret)
    into a guest. Only files directly in a folder named for the instance (instances/<uuid>/) pass, and
    the store volumes its attachments name: ``volumes`` holds their (namespace, name), which must be the
    file's folder and name (``<volume store>/<namespace>/<name>``).
    """
    for path in disk_info:
        pure = posixpath.normpath(path)
        folder, name = posixpath.split(pure)
        if pure != path or not posixpath.isabs(path) or not name:
            raise DriverError(f"refused the source's hand-off: {path!r} is not a plain absolute path")
        if posixpath.basename(folder) != uuid and (posixpath.basename(folder), name) not in volumes:
            raise DriverError(
                f"refused the source's hand-off: {path!r} is neither a file of instances/{uuid}/, the "
                "folder of the instance being moved, nor a volume attached to it"
            )
