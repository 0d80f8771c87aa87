"""Spec translation: a VirtualInstance's spec and flavor, as the driver's InstanceSpec.

Pure: the Secrets it needs are read (or, for VNC, made) by the reconciler beforehand and come in as
``SecretValues``, so translating never writes anything and a unit test needs no apiserver.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ipaddress
import json
from collections.abc import Mapping, Sequence
from typing import Any

from kubenova import api
from kubenova.driver.base import (
    ALLOW_ALL,
    FirewallRule,
    ImageRef,
    InjectedFile,
    InstanceSpec,
    Interface,
    InvalidInstanceSpec,
    KernelBoot,
)
from kubenova.driver.images import ImageStore

#: Spec fields that do not shape the domain's definition: a change of only these needs no redefine (and
#: no Secret read: a VM whose password Secret was deleted after its first boot can still be stopped).
RUNTIME_FIELDS = ("powerState", "rescue", "actions", "nodeSelector", "nodeName", "firewall")
#: What kubenova puts in every definition beyond the spec, as a number: a new one (2: the guest agent's
#: channel, and the host's own CPU under KVM; 3: an interface on the node's default network for a spec that
#: names no interfaces; 4: the serial console a unix socket the agent relays, instead of a pty) changes
#: every definition's digest, so each domain is defined anew once, for its next boot, without a spec
#: change. A definition of the previous format whose Secrets
#: are gone meanwhile stays as it is, unsaid: the user asked for nothing.
DEFINITION_FORMAT, PREVIOUS_FORMAT = 4, 3
#: The interface an instance gets when its spec has no ``interfaces`` (an empty list means none).
DEFAULT_INTERFACE = "default"


@dataclasses.dataclass(frozen=True)
class SecretValues:
    """What an instance's Secrets hold, read before translation; None where the spec names no Secret."""

    admin_password: str | None = None
    user_data: str | None = None
    vnc_password: str | None = None


def spec_interfaces(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The spec's interfaces: without ``interfaces``, one named DEFAULT_INTERFACE on the node's network;
    an empty list means none."""
    return list(spec.get("interfaces", [{"name": DEFAULT_INTERFACE}]))


def boot_image(image: api.BootImage, namespace: str) -> ImageRef:
    """The driver's view of ``spec.boot.image``: a store name, or an address to import from."""
    return ImageRef(
        image.get("name", ""), image.get("checksum"), namespace, image.get("url"), image.get("registry")
    )


def instance_spec(
    uid: str,
    namespace: str,
    name: str,
    spec: api.VirtualInstanceSpec,
    images: ImageStore,
    admin_password: str | None,
    vnc_password: str | None = None,
) -> InstanceSpec:
    """Translate the spec for the driver; names the offending field when the node cannot run it."""
    boot = spec["boot"]
    kernel = boot.get("kernel")
    image = boot.get("image")
    flavor = spec["flavor"]
    files = []
    for index, item in enumerate(spec.get("injectedFiles") or []):
        try:
            files.append(InjectedFile(item["path"], base64.b64decode(item["content"], validate=True)))
        except ValueError as exc:
            raise InvalidInstanceSpec(f"spec.injectedFiles[{index}].content", f"not base64: {exc}") from exc
    return InstanceSpec(
        uuid=uid,
        name=name,
        namespace=namespace,
        vcpus=int(flavor["vcpus"]),
        memory_mib=int(flavor["memoryMiB"]),
        boot=KernelBoot(
            kernel=images.resolve("spec.boot.kernel.image", kernel["image"]),
            initrd=images.resolve("spec.boot.kernel.initrd", kernel["initrd"])
            if kernel.get("initrd")
            else None,
            cmdline=kernel.get("cmdline", "console=ttyS0"),
        )
        if kernel
        else None,
        image=boot_image(image, namespace) if image else None,
        root_gib=(spec.get("rootDisk") or {}).get("sizeGiB"),
        ephemeral_gib=tuple((d["name"], int(d["sizeGiB"])) for d in spec.get("ephemeralDisks") or []),
        swap_mib=(spec.get("swap") or {}).get("sizeMiB"),
        interfaces=tuple(
            Interface(i["name"], i.get("network", ""), i.get("macAddress"), i.get("model", "virtio"))
            for i in spec_interfaces(spec)
        ),
        firewall=firewall_rules(spec.get("firewall")),
        user_data=spec.get("userData"),
        network_config=spec.get("networkConfig"),
        injected_files=tuple(files),
        admin_password=admin_password,
        vnc_password=vnc_password,
        cpu_model=(spec.get("cpu") or {}).get("model"),
    )


def definition_digest(
    spec: Mapping[str, Any], flavor: Mapping[str, Any], definition_format: int = DEFINITION_FORMAT
) -> str:
    """A digest of what a domain's definition is made from: the spec but its runtime fields, with this flavor,
    in this definition format (the first one's digests named none).

    The driver keeps it with the definition (InstanceSpec.revision), so the agent redefines a domain only
    when this changed, even after a restart, and never for a change of power state.
    """
    shaping = {k: v for k, v in spec.items() if k not in RUNTIME_FIELDS}
    shaping["flavor"] = {"vcpus": int(flavor["vcpus"]), "memoryMiB": int(flavor["memoryMiB"])}
    if definition_format > 1:
        shaping["format"] = definition_format
        image = (spec.get("boot") or {}).get("image")
        if image:  # where an image comes from counts only until the root disk is made from it
            shaping["boot"] = {**spec["boot"], "image": {"name": image.get("name", "")}}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:32]


def firewall_rule(rule: Mapping[str, Any], action: str = "accept") -> FirewallRule:
    """One rule of a spec.firewall (an instance's, or a ComputeNode's provider rules) as the driver's."""
    port = rule.get("port")
    cidr = str(ipaddress.ip_network(rule.get("cidr") or "0.0.0.0/0", strict=False))
    return FirewallRule(
        str(rule.get("protocol", "All")).lower(), cidr, port, rule.get("endPort", port), action
    )


def firewall_rules(firewall: Mapping[str, Any] | None) -> tuple[FirewallRule, ...]:
    """What may come in: everything without ``ingress`` (a pod without a NetworkPolicy), else its rules."""
    if not firewall or "ingress" not in firewall:
        return ALLOW_ALL
    return tuple(firewall_rule(rule) for rule in firewall["ingress"] or [])


def provider_rules(firewall: Mapping[str, Any] | None) -> tuple[FirewallRule, ...]:
    """A ComputeNode's (or the chart's) provider rules, in order: Deny drops, Allow accepts."""
    return tuple(
        firewall_rule(rule, "accept" if rule.get("action") == "Allow" else "drop")
        for rule in (firewall or {}).get("ingress") or []
    )


@dataclasses.dataclass(frozen=True)
class NetworkAllowList:
    """The libvirt networks a namespace's instances may join on this node: the node's default network
    for every namespace, and what the cluster admin opened to each namespace besides.

    Joining a network by name is reaching whatever else is on it (another tenant's VMs, a host
    bridge): without a list, any spec could name any network the node has.
    """

    default: tuple[str, ...] = ("default",)
    namespaces: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    #: the node's default network (the agent keeps it): open to every namespace, and where an interface
    #: that names no network goes
    node: str = "kubenova"

    def configured(self, spec: Mapping[str, Any] | None) -> NetworkAllowList:
        """The list the node's ComputeNode sets (``spec.networks``, the cluster admin's live setting), else
        this one (the agent's flags)."""
        if not spec:
            return self
        return NetworkAllowList(
            tuple(spec.get("default") or ()),
            {ns: tuple(names) for ns, names in (spec.get("namespaces") or {}).items()},
            self.node,
        )

    def check(self, namespace: str, interfaces: Sequence[Interface]) -> None:
        """InvalidInstanceSpec naming the first interface on a network the namespace may not join."""
        allowed = (self.node, *self.default, *self.namespaces.get(namespace, ()))
        for index, interface in enumerate(interfaces):
            if interface.network not in allowed:
                raise InvalidInstanceSpec(
                    f"spec.interfaces[{index}].network",
                    f"network {interface.network!r} is not open to namespace {namespace} on this node "
                    f"(open: {', '.join(allowed) or 'none'}); a cluster admin opens more in the "
                    "ComputeNode's spec.networks or the chart value agent.networks",
                )


def driver_spec(
    instance: Mapping[str, Any],
    flavor: Mapping[str, Any],
    images: ImageStore,
    secrets: SecretValues,
    networks: NetworkAllowList,
) -> InstanceSpec:
    """The driver's view of an instance with this flavor (its own or a resize's), with its Secrets' values,
    refused unless its interfaces join only networks its namespace may join.

    The revision is the digest of the spec it was made from, so a later look can tell whether the
    definition still matches the spec without reading any Secret.
    """
    meta, spec = instance["metadata"], instance.get("spec") or {}
    resolved = {
        **spec,
        "flavor": dict(flavor),
        **({"userData": secrets.user_data} if secrets.user_data is not None else {}),
    }
    made = instance_spec(
        meta["uid"],
        meta["namespace"],
        meta["name"],
        resolved,  # type: ignore[arg-type]
        images,
        secrets.admin_password,
        secrets.vnc_password,
    )
    interfaces = tuple(dataclasses.replace(i, network=i.network or networks.node) for i in made.interfaces)
    networks.check(meta["namespace"], interfaces)
    return dataclasses.replace(made, interfaces=interfaces, revision=definition_digest(spec, flavor))


def vnc_secret_name(instance: str) -> str:
    """``<name>-vnc``; a name too long for the suffix is cut and keeps a digest of the whole, so two
    long names that share their start never share a password."""
    if len(instance) <= 249:
        return f"{instance}-vnc"
    return f"{instance[:236]}-{hashlib.sha256(instance.encode()).hexdigest()[:12]}-vnc"
