"""The walking skeleton end to end: a VirtualInstance through the real API becomes a real guest."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import kubernetes
import libvirt
import pytest

from kubenova.handlers.shared import COMPUTENODES, GROUP, NODE_LABEL, VERSION, VIRTUALINSTANCES
from testground import ground as testground
from testground import guest
from tests.helpers import eventually

REPO = pathlib.Path(__file__).resolve().parents[2]

VI: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "VirtualInstance",
    "spec": {
        "flavor": {"vcpus": 1, "memoryMiB": 96},
        "boot": {"kernel": {"image": guest.KERNEL, "initrd": guest.INITRD, "cmdline": guest.CMDLINE}},
    },
}


def make(name: str, **spec: Any) -> dict[str, Any]:
    body = copy.deepcopy(VI)
    body["metadata"] = {"name": name}
    body["spec"].update(spec)
    return body


def get(custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, name)
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def cond(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in (obj or {}).get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return c
    return {}


def domain(hypervisor: libvirt.virConnect, uid: str) -> libvirt.virDomain | None:
    try:
        return hypervisor.lookupByUUIDString(uid)
    except libvirt.libvirtError:
        return None


def test_create_boot_delete(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, make("vm1"))
    uid = created["metadata"]["uid"]

    obj = eventually(
        lambda: (o := get(custom, namespace, "vm1")) and cond(o, "Ready").get("status") == "True" and o,
        timeout=120,
        what="Ready=True",
    )
    status = obj["status"]
    assert (status["phase"], status["powerState"], status["node"]) == ("Running", "Running", ground.node)
    assert status["domainUUID"] == uid
    assert cond(obj, "Scheduled")["status"] == "True"
    assert obj["metadata"]["labels"][NODE_LABEL] == ground.node
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert status["info"]["vcpus"] == 1 and status["info"]["maxMemKiB"] == 96 * 1024

    dom = domain(hypervisor, uid)
    assert dom is not None and dom.isActive()
    assert dom.name() == f"{namespace}_vm1"
    console = ground.console_log(uid)
    eventually(
        lambda: console.exists() and guest.BOOT_MARKER in console.read_text(errors="replace"),
        timeout=120,
        what="the guest's boot marker",
    )
    eventually(
        lambda: f"{guest.TICK} 1" in console.read_text(errors="replace"),
        timeout=30,
        what="the guest's counter",
    )

    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, "vm1")
    eventually(lambda: get(custom, namespace, "vm1") is None, timeout=60, what="the object to be gone")
    assert domain(hypervisor, uid) is None
    assert not console.exists()


def test_stop_and_start_through_the_spec(
    custom: kubernetes.client.CustomObjectsApi, hypervisor: libvirt.virConnect, namespace: str
) -> None:
    uid = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, make("vm2"))[
        "metadata"
    ]["uid"]
    eventually(
        lambda: cond(get(custom, namespace, "vm2"), "Ready").get("status") == "True",
        timeout=120,
        what="Running",
    )
    for power, active in (("Stopped", False), ("Running", True)):
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, VIRTUALINSTANCES, "vm2", {"spec": {"powerState": power}}
        )
        obj = eventually(
            lambda power=power: (
                (o := get(custom, namespace, "vm2"))
                and o["status"].get("powerState") == power
                and cond(o, "Ready").get("status") == "True"
                and o
            ),
            timeout=60,
            what=f"powerState {power}",
        )
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
        dom = domain(hypervisor, uid)
        assert dom is not None and bool(dom.isActive()) is active
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, "vm2")
    eventually(lambda: get(custom, namespace, "vm2") is None, timeout=60, what="deletion")
    assert domain(hypervisor, uid) is None


def test_missing_kernel_fails_clearly_and_leaves_nothing(
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    body = make("nokernel")
    body["spec"]["boot"]["kernel"]["image"] = "no-such-kernel"
    uid = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)[
        "metadata"
    ]["uid"]
    obj = eventually(
        lambda: (
            (o := get(custom, namespace, "nokernel"))
            and cond(o, "Ready").get("reason") == "InvalidSpec"
            and o
        ),
        timeout=60,
        what="the InvalidSpec condition",
    )
    ready = cond(obj, "Ready")
    assert ready["status"] == "False"
    assert "spec.boot.kernel.image" in ready["message"] and "no-such-kernel" in ready["message"]
    assert obj["status"]["phase"] == "Failed"
    events = eventually(
        lambda: [
            e
            for e in core.list_namespaced_event(namespace, field_selector=f"involvedObject.uid={uid}").items
            if e.reason == "InvalidSpec"
        ],
        timeout=30,
        what="an InvalidSpec Event",
    )
    assert events[0].type == "Warning" and "no-such-kernel" in events[0].message
    assert domain(hypervisor, uid) is None
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, "nokernel")
    eventually(lambda: get(custom, namespace, "nokernel") is None, timeout=60, what="deletion")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"flavor": {"vcpus": 0, "memoryMiB": 128}}, "spec.flavor.vcpus"),
        ({"flavor": {"vcpus": 1, "memoryMiB": 1}}, "spec.flavor.memoryMiB"),
        ({"powerState": "Exploded"}, "spec.powerState"),
        ({"boot": {"kernel": {"image": "../../etc/shadow"}}}, "spec.boot.kernel.image"),
        ({"nodeName": "Not_A_Node"}, "spec.nodeName"),
    ],
)
def test_the_schema_rejects_bad_specs_at_apply_time(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, change: dict[str, Any], field: str
) -> None:
    with pytest.raises(kubernetes.client.ApiException) as rejected:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, VIRTUALINSTANCES, make("bad", **change)
        )
    assert rejected.value.status == 422
    assert field in rejected.value.body


def test_node_name_is_immutable(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, ground: testground.Ground
) -> None:
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        VIRTUALINSTANCES,
        make("pinned", nodeName=ground.node, powerState="Stopped"),
    )
    with pytest.raises(kubernetes.client.ApiException) as rejected:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, VIRTUALINSTANCES, "pinned", {"spec": {"nodeName": "elsewhere"}}
        )
    assert rejected.value.status == 422 and "nodeName is immutable" in rejected.value.body
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, "pinned")
    eventually(lambda: get(custom, namespace, "pinned") is None, timeout=60, what="deletion")


def test_an_instance_placed_after_waiting_says_scheduled_whatever_the_agent_answers(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    selector = {"compute.kubenova.io/aggregate": "ssd"}  # no node has it yet; the image no node has either
    body = make("web", nodeSelector=selector, boot={"image": {"name": "debian-12-genericcloud-amd64.qcow2"}})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)
    name = body["metadata"]["name"]
    waiting = eventually(
        lambda: (
            (o := get(custom, namespace, name))
            and cond(o, "Scheduled").get("reason") == "Unschedulable"
            and o
        ),
        timeout=60,
        what="Unschedulable: no node has the label",
    )
    assert cond(waiting, "Scheduled")["status"] == "False"
    custom.patch_cluster_custom_object(
        GROUP, VERSION, COMPUTENODES, ground.node, {"metadata": {"labels": selector}}
    )
    try:
        obj = eventually(
            lambda: (
                (o := get(custom, namespace, name))
                and cond(o, "Ready").get("reason")
                and cond(o, "Ready").get("reason") != "Unschedulable"
                and o.get("status", {}).get("node")
                and o
            ),
            timeout=60,
            what="the agent's answer",
        )
    finally:
        custom.patch_cluster_custom_object(
            GROUP,
            VERSION,
            COMPUTENODES,
            ground.node,
            {"metadata": {"labels": {key: None for key in selector}}},
        )
    assert obj["metadata"]["labels"][NODE_LABEL] == ground.node
    assert cond(obj, "Ready")["status"] == "False", cond(obj, "Ready")
    scheduled = cond(obj, "Scheduled")
    assert (scheduled["status"], scheduled["reason"], scheduled["message"]) == (
        "True",
        "Placed",
        f"placed on {ground.node}",
    ), scheduled
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, name)
    eventually(lambda: get(custom, namespace, name) is None, timeout=60, what="deletion")
