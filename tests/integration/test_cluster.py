"""Cluster behaviour: agents see only their own objects, placement honours node switches,
ComputeNodes carry a Lease and host facts, and only one controller acts at a time."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from typing import Any

import kubernetes
import libvirt
import pytest

from kubenova.driver.base import InstanceSpec, KernelBoot
from kubenova.driver.images import ImageStore
from kubenova.driver.libvirt.driver import LibvirtDriver
from kubenova.handlers.agent.node_reporter import lease_name
from kubenova.handlers.controller import binding
from kubenova.handlers.shared import COMPUTENODES, GROUP, LEASE_NAMESPACE, VERSION, VIRTUALINSTANCES
from testground import ground as testground
from testground import guest, procs
from tests.helpers import eventually
from tests.integration.test_agent import delete_and_wait, wait_ready
from tests.integration.test_virtualinstance import cond, domain, get, make

FAKE_NODE = "fake-1"


def node_obj(custom: kubernetes.client.CustomObjectsApi, name: str) -> dict[str, Any]:
    return custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, name)


def events_about(core: kubernetes.client.CoreV1Api, namespace: str, uid: str) -> list[Any]:
    return core.list_namespaced_event(namespace, field_selector=f"involvedObject.uid={uid}").items


@pytest.fixture
def fake_agent(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    api_client: kubernetes.client.ApiClient,
) -> Iterator[str]:
    """A second node whose agent uses the in-memory driver, logging every watch event it receives."""
    name = f"agent-{FAKE_NODE}"
    procs.start(
        ground.layout,
        name,
        [
            sys.executable,
            "-m",
            "kubenova.cli",
            "-v",
            "agent",
            "--node",
            FAKE_NODE,
            "--driver",
            "fake",
            "--image-store",
            str(ground.image_store),
            "--metrics-address",
            "127.0.0.1:29480",
        ],
        f"--node {FAKE_NODE}",
        env=ground.env(),
    )
    try:
        eventually(
            lambda: (
                (node_obj(custom, FAKE_NODE).get("status") or {}).get("capacity")
                if FAKE_NODE
                in [
                    n["metadata"]["name"]
                    for n in custom.list_cluster_custom_object(GROUP, VERSION, COMPUTENODES)["items"]
                ]
                else None
            ),
            timeout=60,
            what="the fake node",
        )
        yield FAKE_NODE
    finally:
        procs.stop(ground.layout, name)
        # Gone for good: placement must not pick it for later tests.
        custom.delete_cluster_custom_object(GROUP, VERSION, COMPUTENODES, FAKE_NODE)
        kubernetes.client.CoordinationV1Api(api_client).delete_namespaced_lease(
            lease_name(FAKE_NODE), LEASE_NAMESPACE
        )


def test_each_agent_receives_only_its_own_objects(
    ground: testground.Ground,
    fake_agent: str,
    custom: kubernetes.client.CustomObjectsApi,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    mine = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, VIRTUALINSTANCES, make("on-fake", nodeName=fake_agent)
    )["metadata"]["uid"]
    theirs = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, VIRTUALINSTANCES, make("on-real", nodeName=ground.node)
    )["metadata"]["uid"]
    assert wait_ready(custom, namespace, "on-fake")["status"]["node"] == fake_agent
    assert wait_ready(custom, namespace, "on-real")["status"]["node"] == ground.node
    assert domain(hypervisor, theirs) is not None
    delete_and_wait(custom, namespace, "on-fake")
    delete_and_wait(custom, namespace, "on-real")
    received = ground.layout.logfile(f"agent-{fake_agent}").read_text()
    assert f"({mine})" in received, "the fake agent logs the watch events it receives"
    assert f"({theirs})" not in received, "the fake agent received another node's object"
    assert domain(hypervisor, mine) is None, "the real node's libvirt never got the fake node's instance"


def test_a_disabled_node_gets_no_new_instances(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    namespace: str,
) -> None:
    custom.patch_cluster_custom_object(
        GROUP, VERSION, COMPUTENODES, ground.node, {"spec": {"enabled": False}}
    )
    try:
        uid = custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, VIRTUALINSTANCES, make("waits")
        )["metadata"]["uid"]
        obj = eventually(
            lambda: (
                (o := get(custom, namespace, "waits"))
                and cond(o, "Scheduled").get("reason") == "Unschedulable"
                and o
            ),
            timeout=30,
            what="Unschedulable",
        )
        assert f"{ground.node}: disabled" in cond(obj, "Scheduled")["message"]
        assert not obj["metadata"].get("labels"), "not bound"
        eventually(
            lambda: [e for e in events_about(core, namespace, uid) if e.reason == "Unschedulable"],
            timeout=30,
            what="an Unschedulable Event",
        )
    finally:
        custom.patch_cluster_custom_object(
            GROUP, VERSION, COMPUTENODES, ground.node, {"spec": {"enabled": True}}
        )
    obj = wait_ready(custom, namespace, "waits")  # enabling the node is the capacity it waited for
    assert obj["status"]["node"] == ground.node and cond(obj, "Scheduled")["status"] == "True"
    delete_and_wait(custom, namespace, "waits")


def test_a_pass_holding_an_old_copy_never_calls_a_bound_instance_unschedulable(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    """Found by CI: a pending pass that read the instance before another pass bound it counted the
    instance's own reservation against it and wrote Unschedulable over the agent's status."""
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, VIRTUALINSTANCES, make("bound")
    )
    obj = wait_ready(custom, namespace, "bound")
    assert binding.choose(custom, created, {}, {}) is None  # no node fits the old copy
    fresh = get(custom, namespace, "bound")
    assert fresh["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"], "nothing was written"
    assert cond(fresh, "Scheduled")["status"] == "True" and fresh["status"]["phase"] == obj["status"]["phase"]
    delete_and_wait(custom, namespace, "bound")


def test_node_lease_host_facts_power_action_and_unknown_domains(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    api_client: kubernetes.client.ApiClient,
) -> None:
    leases = kubernetes.client.CoordinationV1Api(api_client)
    first = leases.read_namespaced_lease(lease_name(ground.node), LEASE_NAMESPACE).spec.renew_time
    eventually(
        lambda: (
            leases.read_namespaced_lease(lease_name(ground.node), LEASE_NAMESPACE).spec.renew_time > first
        ),
        timeout=30,
        interval=1,
        what="a Lease renewal",
    )
    status = node_obj(custom, ground.node)["status"]
    assert status["hostIP"] and cond({"status": status}, "Ready")["status"] == "True"

    custom.patch_cluster_custom_object(
        GROUP,
        VERSION,
        COMPUTENODES,
        ground.node,
        {"spec": {"powerAction": {"id": f"p-{uuid.uuid4().hex[:6]}", "action": "Reboot"}}},
    )
    node = eventually(
        lambda: (
            (n := node_obj(custom, ground.node))["status"].get("powerAction", {}).get("id")
            == n["spec"]["powerAction"]["id"]
            and n
        ),
        timeout=30,
        what="the power action's answer",
    )
    assert node["status"]["powerAction"]["phase"] == "Failed"
    supported = cond(node, "PowerActionSupported")
    assert supported["status"] == "False" and supported["reason"] == "Unsupported"

    # A kubenova domain that no VirtualInstance describes is reported, left alone, and forgotten once gone.
    store = ImageStore(ground.image_store)
    stray = LibvirtDriver(
        ground.libvirt_uri, "qemu", ground.node_dir() / "instances", store, ground.volume_store()
    )
    spec = InstanceSpec(
        uuid=str(uuid.uuid4()),
        name="stray",
        namespace="nowhere",
        vcpus=1,
        memory_mib=96,
        boot=KernelBoot(store.resolve("k", guest.KERNEL), store.resolve("i", guest.INITRD), guest.CMDLINE),
    )
    stray.spawn(spec)
    try:
        unknown = eventually(
            lambda: (
                (c := cond(node_obj(custom, ground.node), "UnknownDomains")).get("status") == "True"
                and spec.uuid in c["message"]
                and c
            ),
            timeout=90,
            interval=1,
            what="UnknownDomains naming the stray domain",
        )
        assert "nowhere/stray" in unknown["message"]
        assert stray.instance_exists(spec.uuid), "the agent leaves unknown domains alone"
    finally:
        stray.destroy(spec.uuid)
        stray.host.close()
    eventually(
        lambda: spec.uuid not in cond(node_obj(custom, ground.node), "UnknownDomains")["message"],
        timeout=90,
        interval=1,
        what="the stray domain forgotten",
    )


def test_only_one_controller_acts(
    ground: testground.Ground,
    api_client: kubernetes.client.ApiClient,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
) -> None:
    leases = kubernetes.client.CoordinationV1Api(api_client)
    holder = leases.read_namespaced_lease("kubenova-controller", LEASE_NAMESPACE).spec.holder_identity
    procs.start(
        ground.layout,
        "controller-standby",
        [sys.executable, "-m", "kubenova.cli", "controller"],
        "kubenova.cli controller",
        env=ground.env(),
    )
    try:
        log = ground.layout.logfile("controller-standby")
        eventually(
            lambda: log.exists() and "waiting for the leader Lease" in log.read_text(),
            timeout=30,
            what="the second controller to wait as a follower",
        )
        # The active one is killed: the standby takes the Lease over and places new instances.
        procs.stop(ground.layout, "controller")
        eventually(
            lambda: (
                leases.read_namespaced_lease("kubenova-controller", LEASE_NAMESPACE).spec.holder_identity
                != holder
            ),
            timeout=60,
            interval=0.5,
            what="the standby to take the Lease",
        )
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, make("failover"))
        wait_ready(custom, namespace, "failover")
        delete_and_wait(custom, namespace, "failover")
    finally:
        procs.stop(ground.layout, "controller-standby")
        testground.start_kubenova(ground)  # the regular controller again
