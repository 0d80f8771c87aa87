"""Services in front of VMs, the pure part: which VirtualInstances an opted-in Service selects, and the one
EndpointSlice that points the Service at them.

kube-proxy and cluster DNS read EndpointSlices, not Pods: a slice labelled with a Service's name is all it
takes to put that Service in front of VMs, with no pod per VM. A Service opts in with the label
``compute.kubenova.io/expose: "true"`` and a selector; its slice lists the instances of its own namespace
whose labels match that selector and that have a leased address.

The address is ``status.interfaces[*].ipAddress``, which the node's agent writes from its libvirt network's
DHCP leases. A compromised agent could write any address there and so point a tenant's Service anywhere;
an address is therefore published only inside the subnet the bound node reports for its default network,
and never as that network's own, broadcast or gateway (the host) address. What the guest agent reports
(``status.ipAddresses``) is never used. service_endpoints.py watches and writes; nothing here calls the API.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubenova.handlers.shared import EXPOSE_LABEL, GROUP, NODE_LABEL, VERSION, condition

#: The labels that make a slice a Service's (kube-proxy, DNS) and say who keeps it (Kubernetes' own
#: EndpointSlice controller leaves slices of other managers alone).
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "kubenova.io"
SLICE_SUFFIX = "-kubenova"
#: A slice's name stays a valid label value (63 characters), as the Service's own name is.
MAX_NAME = 63
#: The API's limit for one EndpointSlice.
MAX_ENDPOINTS = 1000
#: The widest default network a node may claim: a subnet is what vouches for its agent's addresses, so one
#: that covers the cluster's other networks would vouch for anything.
MIN_PREFIX = 16


@dataclasses.dataclass(frozen=True)
class Instance:
    """What a slice needs of one VirtualInstance. The controller's index keeps this much, and an event
    that leaves it equal cannot change any slice."""

    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str]
    #: The binding label, which only the controller sets (admission keeps users and agents off it).
    node: str | None
    #: (network, address) of each status interface with a leased address, in status order.
    leases: tuple[tuple[str, str], ...]
    ready: bool
    terminating: bool


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why something a Service asks for is not in its slice: a Warning Event on the Service."""

    reason: str
    message: str


def instance_of(body: Mapping[str, Any]) -> Instance:
    meta, status = body["metadata"], body.get("status") or {}
    labels = dict(meta.get("labels") or {})
    leases = tuple(
        (str(nic.get("network") or ""), str(nic["ipAddress"]))
        for nic in status.get("interfaces") or []
        if isinstance(nic, Mapping) and nic.get("ipAddress")
    )
    terminating = bool(meta.get("deletionTimestamp"))
    # Ready says the domain reached the power state the spec asks for, which may be Stopped or Paused (or
    # Running from a rescue image): an endpoint is ready only when the guest runs its own disk as well.
    ready = (
        (condition(status, "Ready") or {}).get("status") == "True"
        and status.get("phase") == "Running"
        and not terminating
    )
    return Instance(
        meta.get("namespace") or "",
        meta["name"],
        meta["uid"],
        labels,
        labels.get(NODE_LABEL),
        leases,
        ready,
        terminating,
    )


def exposed(service: Mapping[str, Any]) -> bool:
    """Whether kubenova keeps a slice for this Service: it opted in and selects something. An ExternalName
    Service has no endpoints at all."""
    meta, spec = service.get("metadata") or {}, service.get("spec") or {}
    return (
        (meta.get("labels") or {}).get(EXPOSE_LABEL) == "true"
        and bool(spec.get("selector"))
        and spec.get("type") != "ExternalName"
    )


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A Service's selection: every key=value of its selector. An empty selector selects nothing here (a
    Service without one manages its own endpoints)."""
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def slice_name(service: str) -> str:
    """``<service>-kubenova``; a long Service name is cut, with a hash of the whole name so that two
    names that share their beginning never share a slice."""
    name = service + SLICE_SUFFIX
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(service.encode()).hexdigest()[:8]
    keep = MAX_NAME - len(SLICE_SUFFIX) - len(digest) - 1
    return f"{service[:keep].rstrip('-')}-{digest}{SLICE_SUFFIX}"


def slice_ports(spec: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[Problem]]:
    """The slice's ports: each Service port's target, a number. A named targetPort means a port a pod's
    container names; a VM names none, so that port is left out and the Service told how to fix it."""
    ports: list[dict[str, Any]] = []
    problems = []
    for i, port in enumerate(spec.get("ports") or []):
        target = port.get("targetPort", port.get("port"))
        if isinstance(target, str):
            problems.append(
                Problem(
                    "NamedTargetPort",
                    f"spec.ports[{i}].targetPort is {target!r}, a port name: a VirtualInstance has no named "
                    "ports, so this port is not published; set targetPort to the number the guest listens on",
                )
            )
            continue
        # The name is always written, "" included: kube-proxy ignores a slice port without one.
        entry: dict[str, Any] = {
            "name": port.get("name") or "",
            "protocol": port.get("protocol") or "TCP",
            "port": int(target),
        }
        if port.get("appProtocol"):
            entry["appProtocol"] = port["appProtocol"]
        ports.append(entry)
    return ports, problems


def node_subnet(node: str, network: Mapping[str, Any] | None) -> tuple[ipaddress.IPv4Network | None, str]:
    """The subnet a node's default network vouches for, or None and why it vouches for nothing."""
    subnet = (network or {}).get("subnet")
    if not subnet:
        return None, f"ComputeNode {node} reports no status.network.subnet yet"
    try:
        net = ipaddress.IPv4Network(str(subnet), strict=False)
    except ValueError:
        return None, f"ComputeNode {node} reports status.network.subnet {subnet!r}, which is no IPv4 network"
    if net.prefixlen < MIN_PREFIX or not net.is_private or net.is_loopback or net.is_link_local:
        return None, (
            f"ComputeNode {node} reports status.network.subnet {net}, which kubenova does not accept "
            f"(a private IPv4 network of /{MIN_PREFIX} or narrower)"
        )
    return net, ""


def leased_address(
    instance: Instance, network: Mapping[str, Any] | None
) -> tuple[str | None, Problem | None]:
    """The address to publish for an instance, or None and (when there is something to say) why not.

    An interface on the node's default network comes first: that network's subnet is what can vouch for
    an address. No lease yet is nothing to warn about: the guest is still booting."""
    if not instance.leases or not instance.node:
        return None, None
    default = (network or {}).get("name")
    _, address = next(((n, a) for n, a in instance.leases if default and n == default), instance.leases[0])
    where = f"VirtualInstance {instance.name} on node {instance.node} has the address {address!r}"
    net, why = node_subnet(instance.node, network)
    if net is None:
        return None, Problem("NodeSubnetUnknown", f"{where}, not published: {why}")
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return None, Problem("AddressOutsideNodeSubnet", f"{where}, which is no IPv4 address; not published")
    gateway = (network or {}).get("gateway")
    if ip not in net or ip in (net.network_address, net.broadcast_address) or str(ip) == gateway:
        return None, Problem(
            "AddressOutsideNodeSubnet",
            f"{where}, which is no guest address of the node's network {net} (gateway {gateway}); "
            "not published (its agent may be compromised)",
        )
    return str(ip), None


def endpoint(instance: Instance, address: str, publish_not_ready: bool = False) -> dict[str, Any]:
    """One instance's endpoint. ``publish_not_ready``: the Service's spec.publishNotReadyAddresses, which
    makes every endpoint ready (as Kubernetes does for pods); serving still says the truth."""
    return {
        "addresses": [address],
        "conditions": {
            "ready": instance.ready or publish_not_ready,
            "serving": instance.ready,
            "terminating": instance.terminating,
        },
        "nodeName": instance.node,
        "targetRef": {
            "kind": "VirtualInstance",
            "apiVersion": f"{GROUP}/{VERSION}",
            "namespace": instance.namespace,
            "name": instance.name,
            "uid": instance.uid,
        },
    }


def desired_slice(
    service: Mapping[str, Any],
    instances: Iterable[Instance],
    network_of: Callable[[str], Mapping[str, Any] | None],
) -> tuple[dict[str, Any], list[Problem]]:
    """The slice an exposed Service should have, and what it leaves out and why.

    Only instances of the Service's own namespace count, whatever ``instances`` holds. Endpoints are in
    name order, so the same instances always give the same slice (and no write)."""
    meta, spec = service["metadata"], service.get("spec") or {}
    namespace, selector = meta["namespace"], spec.get("selector") or {}
    ports, problems = slice_ports(spec)
    endpoints = []
    for instance in sorted(instances, key=lambda i: i.name):
        if instance.namespace != namespace or not selects(selector, instance.labels):
            continue
        address, problem = leased_address(instance, network_of(instance.node) if instance.node else None)
        if problem is not None:
            problems.append(problem)
        if address is not None:
            endpoints.append(endpoint(instance, address, bool(spec.get("publishNotReadyAddresses"))))
    if len(endpoints) > MAX_ENDPOINTS:
        problems.append(
            Problem(
                "TooManyEndpoints",
                f"the selector matches {len(endpoints)} instances with addresses; the first {MAX_ENDPOINTS} "
                "by name are published (one EndpointSlice's limit)",
            )
        )
        endpoints = endpoints[:MAX_ENDPOINTS]
    body = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name(meta["name"]),
            "namespace": namespace,
            "labels": {SERVICE_NAME_LABEL: meta["name"], MANAGED_BY_LABEL: MANAGED_BY},
            # Kubernetes' garbage collector deletes the slice with its Service, whatever kubenova does.
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                }
            ],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }
    return body, problems


def unchanged(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether the slice there already says what ``desired`` says, in the fields kubenova sets: a label
    or an annotation someone else added is no reason to write."""
    there, wanted = current.get("metadata") or {}, desired["metadata"]
    labels = there.get("labels") or {}
    return (
        all(labels.get(key) == value for key, value in wanted["labels"].items())
        and (there.get("ownerReferences") or []) == wanted["ownerReferences"]
        and current.get("addressType") == desired["addressType"]
        and (current.get("endpoints") or []) == desired["endpoints"]
        and (current.get("ports") or []) == desired["ports"]
    )


def replacement(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The update of the slice there: what kubenova sets, the labels and annotations others added kept,
    guarded by the resourceVersion it was compared with (a stale copy is refused with 409)."""
    there = current.get("metadata") or {}
    meta = {
        **desired["metadata"],
        "labels": {**(there.get("labels") or {}), **desired["metadata"]["labels"]},
        "resourceVersion": there["resourceVersion"],
    }
    if there.get("annotations"):
        meta["annotations"] = dict(there["annotations"])
    return {**desired, "metadata": meta}
