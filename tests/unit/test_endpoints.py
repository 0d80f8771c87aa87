"""The pure part of Services in front of VMs: which instances a Service selects, and the EndpointSlice that
says where they are (selection, namespaces, readiness, the node-subnet check, ports, names)."""

from __future__ import annotations

from typing import Any

from kubenova.handlers.controller.endpoints import (
    MANAGED_BY_LABEL,
    MAX_ENDPOINTS,
    MAX_NAME,
    SERVICE_NAME_LABEL,
    desired_slice,
    exposed,
    instance_of,
    replacement,
    slice_name,
    unchanged,
)
from kubenova.handlers.shared import EXPOSE_LABEL, NODE_LABEL

NETWORKS = {
    "node-a": {"name": "default", "bridge": "virbr0", "subnet": "10.222.0.0/24", "gateway": "10.222.0.1"},
    "node-b": {"name": "default", "bridge": "virbr0", "subnet": "10.222.1.0/24", "gateway": "10.222.1.1"},
}


def service(
    name: str = "web",
    namespace: str = "team-a",
    selector: dict[str, str] | None = None,
    ports: list[dict[str, Any]] | None = None,
    **labels: str,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "labels": {EXPOSE_LABEL: "true", **labels},
        },
        "spec": {
            "selector": {"app": "web"} if selector is None else selector,
            "ports": ports if ports is not None else [{"port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }


def instance(
    name: str,
    namespace: str = "team-a",
    node: str | None = "node-a",
    address: str | None = "10.222.0.10",
    ready: bool = True,
    deleting: bool = False,
    labels: dict[str, str] | None = None,
    interfaces: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": f"uid-{name}",
        "labels": {"app": "web", **({NODE_LABEL: node} if node else {}), **(labels or {})},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    nic: dict[str, Any] = {"name": "eth0", "macAddress": "52:54:00:00:00:01", "network": "default"}
    if address:
        nic["ipAddress"] = address
    return {
        "metadata": meta,
        "status": {
            "interfaces": [nic] if interfaces is None else interfaces,
            # What the guest agent reports is never trusted: it must never reach a slice.
            "ipAddresses": ["192.0.2.66"],
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def compute(svc: dict[str, Any], *bodies: dict[str, Any], networks: dict[str, Any] | None = None) -> Any:
    known = NETWORKS if networks is None else networks
    return desired_slice(svc, [instance_of(b) for b in bodies], known.get)


def addresses(body: dict[str, Any]) -> dict[str, str]:
    return {e["targetRef"]["name"]: e["addresses"][0] for e in body["endpoints"]}


def test_a_service_selects_the_labelled_instances_of_its_own_namespace_only() -> None:
    body, problems = compute(
        service(selector={"app": "web", "tier": "front"}),
        instance("front", labels={"tier": "front"}),
        instance("back", labels={"tier": "back"}),
        instance("untiered"),
        # Same labels, same address range, another namespace: never selected.
        instance("intruder", namespace="team-b", labels={"tier": "front"}, address="10.222.0.11"),
    )
    assert addresses(body) == {"front": "10.222.0.10"}
    assert problems == []
    assert body["metadata"]["namespace"] == "team-a"


def test_each_endpoint_names_its_instance_its_node_and_its_leased_address() -> None:
    body, _ = compute(service(), instance("vm-1"), instance("vm-0", node="node-b", address="10.222.1.5"))
    assert body["apiVersion"] == "discovery.k8s.io/v1" and body["kind"] == "EndpointSlice"
    assert body["addressType"] == "IPv4"
    assert body["metadata"]["name"] == "web-kubenova"
    assert body["metadata"]["labels"] == {
        SERVICE_NAME_LABEL: "web",
        MANAGED_BY_LABEL: "kubenova.io",
    }
    assert body["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "uid-web", "controller": True}
    ]
    assert body["endpoints"] == [  # in name order, so the same instances always make the same slice
        {
            "addresses": ["10.222.1.5"],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": "node-b",
            "targetRef": {
                "kind": "VirtualInstance",
                "apiVersion": "compute.kubenova.io/v1alpha1",
                "namespace": "team-a",
                "name": "vm-0",
                "uid": "uid-vm-0",
            },
        },
        {
            "addresses": ["10.222.0.10"],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": "node-a",
            "targetRef": {
                "kind": "VirtualInstance",
                "apiVersion": "compute.kubenova.io/v1alpha1",
                "namespace": "team-a",
                "name": "vm-1",
                "uid": "uid-vm-1",
            },
        },
    ]


def test_readiness_follows_the_ready_condition_and_deletion() -> None:
    body, _ = compute(
        service(),
        instance("up"),
        instance("down", address="10.222.0.11", ready=False),
        instance("going", address="10.222.0.12", deleting=True),
    )
    conditions = {e["targetRef"]["name"]: e["conditions"] for e in body["endpoints"]}
    assert conditions == {
        "up": {"ready": True, "serving": True, "terminating": False},
        "down": {"ready": False, "serving": False, "terminating": False},
        "going": {"ready": False, "serving": False, "terminating": True},
    }
    unknown = instance("unknown")
    unknown["status"]["conditions"] = [{"type": "Ready", "status": "Unknown"}]  # its node is unreachable
    body, _ = compute(service(), unknown)
    assert body["endpoints"][0]["conditions"]["ready"] is False


def test_a_service_that_publishes_not_ready_addresses_gets_every_endpoint_ready() -> None:
    svc = service()
    svc["spec"]["publishNotReadyAddresses"] = True
    body, _ = compute(svc, instance("down", ready=False))
    assert body["endpoints"][0]["conditions"] == {"ready": True, "serving": False, "terminating": False}


def test_a_guest_stopped_paused_or_rescued_as_asked_is_ready_but_serves_nothing() -> None:
    """Ready=True says the domain reached the power state the spec asks for; only a Running guest on its
    own disk serves."""
    for phase in ("Stopped", "Paused", "Suspended", "Rescued", "Pending"):
        stopped = instance("vm")
        stopped["status"]["phase"] = phase
        body, _ = compute(service(), stopped)
        assert body["endpoints"][0]["conditions"] == {"ready": False, "serving": False, "terminating": False}


def test_an_instance_without_a_lease_or_a_node_is_left_out_quietly() -> None:
    body, problems = compute(service(), instance("booting", address=None), instance("pending", node=None))
    assert body["endpoints"] == [] and problems == []


def test_an_address_is_published_only_inside_its_bound_nodes_subnet() -> None:
    """A compromised agent writes status: whatever it claims, only a guest address of the subnet its own
    node reports is published; never the gateway (the host itself) or the network's own addresses."""
    body, problems = compute(
        service(),
        instance("ok", address="10.222.0.10"),
        instance("elsewhere", address="10.96.0.1"),  # e.g. the cluster's kubernetes Service
        instance("other-node", address="10.222.1.10"),  # inside node-b's subnet, but bound to node-a
        instance("gateway", address="10.222.0.1"),
        instance("broadcast", address="10.222.0.255"),
        instance("network", address="10.222.0.0"),
        instance("garbage", address="not-an-ip"),
    )
    assert addresses(body) == {"ok": "10.222.0.10"}
    assert {p.reason for p in problems} == {"AddressOutsideNodeSubnet"}
    said = "\n".join(p.message for p in problems)
    for name in ("elsewhere", "other-node", "gateway", "broadcast", "network", "garbage"):
        assert f"VirtualInstance {name} on node node-a" in said


def test_a_node_that_reports_no_usable_subnet_vouches_for_no_address() -> None:
    for network, why in (
        (None, "reports no status.network.subnet"),
        ({"name": "default", "subnet": "0.0.0.0/0"}, "does not accept"),
        ({"name": "default", "subnet": "10.0.0.0/8"}, "does not accept"),  # would cover the pod network
        ({"name": "default", "subnet": "8.8.8.0/24"}, "does not accept"),  # not private
        ({"name": "default", "subnet": "banana"}, "no IPv4 network"),
    ):
        networks = {"node-a": network} if network else {}
        body, problems = compute(service(), instance("vm"), networks=networks)
        assert body["endpoints"] == []
        assert [p.reason for p in problems] == ["NodeSubnetUnknown"] and why in problems[0].message, network


def test_an_interface_on_the_nodes_default_network_comes_first() -> None:
    nics = [
        {"name": "eth0", "network": "kubenova-test", "ipAddress": "192.168.50.4"},
        {"name": "eth1", "network": "default", "ipAddress": "10.222.0.20"},
    ]
    body, problems = compute(service(), instance("vm", interfaces=nics))
    assert addresses(body) == {"vm": "10.222.0.20"} and problems == []


def test_ports_are_the_numeric_target_ports_and_a_named_one_is_left_out_with_the_fix() -> None:
    body, problems = compute(
        service(
            ports=[
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},  # no targetPort: the Service port
                {"name": "admin", "port": 9000, "targetPort": "admin", "protocol": "TCP"},
                {"name": "grpc", "port": 9090, "targetPort": 9091, "appProtocol": "grpc"},
            ]
        ),
        instance("vm"),
    )
    assert body["ports"] == [
        {"name": "http", "protocol": "TCP", "port": 8080},
        {"name": "dns", "protocol": "UDP", "port": 53},
        {"name": "grpc", "protocol": "TCP", "port": 9091, "appProtocol": "grpc"},
    ]
    (named,) = problems
    assert named.reason == "NamedTargetPort"
    assert "spec.ports[2].targetPort" in named.message and "number" in named.message
    single, _ = compute(service(ports=[{"port": 80, "targetPort": 80}]), instance("vm"))
    # An unnamed Service port is written with name "": kube-proxy ignores a slice port without a name.
    assert single["ports"] == [{"name": "", "protocol": "TCP", "port": 80}]


def test_a_long_service_name_is_cut_with_a_hash_of_the_whole_name() -> None:
    assert slice_name("web") == "web-kubenova"
    fits = "a" * (MAX_NAME - len("-kubenova"))
    assert slice_name(fits) == fits + "-kubenova"
    one, two = "s" * 62 + "1", "s" * 62 + "2"
    assert len(slice_name(one)) == MAX_NAME and slice_name(one).endswith("-kubenova")
    assert slice_name(one) != slice_name(two)
    assert slice_name(one) == slice_name(one)


def test_only_an_opted_in_service_with_a_selector_is_exposed() -> None:
    assert exposed(service())
    unlabelled = service()
    unlabelled["metadata"]["labels"] = {}
    assert not exposed(unlabelled)
    wrong = service()
    wrong["metadata"]["labels"][EXPOSE_LABEL] = "yes"
    assert not exposed(wrong)
    assert not exposed(service(selector={}))
    external = service()
    external["spec"]["type"] = "ExternalName"
    assert not exposed(external)


def test_a_slice_that_already_says_it_is_not_written_again() -> None:
    desired, _ = compute(service(), instance("vm"))
    there = {
        **desired,
        "metadata": {
            **desired["metadata"],
            "resourceVersion": "7",
            "labels": {**desired["metadata"]["labels"], "team": "a"},  # someone else's label
            "annotations": {"note": "kept"},
        },
    }
    assert unchanged(there, desired)
    assert unchanged({**there, "endpoints": None, "ports": None}, {**desired, "endpoints": [], "ports": []})
    not_ready, _ = compute(service(), instance("vm", ready=False))
    assert not unchanged(there, not_ready)
    moved = {**there, "metadata": {**there["metadata"], "ownerReferences": []}}
    assert not unchanged(moved, desired)
    update = replacement(there, not_ready)
    assert update["metadata"]["resourceVersion"] == "7"
    assert update["metadata"]["labels"]["team"] == "a" and update["metadata"]["annotations"] == {
        "note": "kept"
    }
    assert update["endpoints"] == not_ready["endpoints"]


def test_one_slice_holds_at_most_the_apis_limit_of_endpoints() -> None:
    many = [
        instance(f"vm-{i:04d}", address=f"10.222.{i // 250}.{i % 250 + 2}") for i in range(MAX_ENDPOINTS + 5)
    ]
    networks = {"node-a": {"name": "default", "subnet": "10.222.0.0/16", "gateway": "10.222.255.254"}}
    body, problems = compute(service(), *many, networks=networks)
    assert len(body["endpoints"]) == MAX_ENDPOINTS
    assert [p.reason for p in problems] == ["TooManyEndpoints"]
