"""The guest agent's channel and the guest's CPU on the real test ground (TCG, the busybox test guest).

The test guest runs no QEMU guest agent, so these tests see the host's half of the guest agent: the channel
libvirt gives every domain, status.guestAgent saying no agent answers, a password reset and a snapshot
that name that cause. A guest that runs an agent (Debian's cloud image) is another test's.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import kubernetes
import libvirt
import pytest

from kubenova.handlers.shared import COMPUTENODES, GROUP, NODE_LABEL, VERSION, VIRTUALINSTANCES
from testground import ground as testground
from testground import guest
from tests.helpers import eventually
from tests.integration.test_agent import delete_and_wait, patch_spec, wait_action, wait_ready
from tests.integration.test_image_imports import create
from tests.integration.test_virtualinstance import cond, domain, get, make

AGENT_PORT = "org.qemu.guest_agent.0"
#: A CPU model libvirt knows no host by.
NO_SUCH_MODEL = "KubenovaNoSuchCPU"


def agent_channel(xml: str) -> ET.Element:
    channels = [
        c
        for c in ET.fromstring(xml).findall("devices/channel")
        if (target := c.find("target")) is not None and target.get("name") == AGENT_PORT
    ]
    assert len(channels) == 1, xml
    return channels[0]


def cpu_of(xml: str) -> tuple[str | None, str | None, str | None]:
    cpu = ET.fromstring(xml).find("cpu")
    assert cpu is not None, xml
    model = cpu.find("model")
    return cpu.get("mode"), cpu.findtext("model"), model.get("fallback") if model is not None else None


def node_models(custom: kubernetes.client.CustomObjectsApi, node: str) -> list[str]:
    found = custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, node)
    return list((found.get("status") or {}).get("cpuModels") or [])


def test_every_domain_has_the_guest_agents_channel_and_tcg_gives_qemu64(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    uid = create(custom, namespace, make("channel"))
    wait_ready(custom, namespace, "channel")
    dom = domain(hypervisor, uid)
    assert dom is not None
    live = dom.XMLDesc(0)
    channel = agent_channel(live)
    target, source = channel.find("target"), channel.find("source")
    assert channel.get("type") == "unix" and target is not None and target.get("type") == "virtio"
    assert source is not None and source.get("mode") == "bind" and source.get("path"), (
        "libvirt picks the path"
    )
    assert target.get("state") == "disconnected", "the test guest runs no agent"
    mode, model, fallback = cpu_of(live)
    assert (mode, model, fallback) == ("custom", "qemu64", "forbid"), "TCG: qemu64 exactly"
    definition = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert cpu_of(definition) == ("custom", "qemu64", "forbid")
    kept = agent_channel(definition).find("source")
    assert kept is None or not kept.get("path"), "no socket path is kept: each host picks its own"

    eventually(
        lambda: (
            ((get(custom, namespace, "channel") or {}).get("status") or {}).get("guestAgent")
            == {"connected": False}
        ),
        timeout=90,
        what="status.guestAgent saying no agent answers",
    )

    # A password reset says why it cannot work, in its answer and in the Event's reason.
    core.create_namespaced_secret(namespace, {"metadata": {"name": "pw"}, "stringData": {"password": "x1"}})
    patch_spec(
        custom,
        namespace,
        "channel",
        {
            "adminPasswordSecretRef": {"name": "pw"},
            "actions": {"passwordReset": {"id": "p1", "user": "debian"}},
        },
    )
    ack = wait_action(custom, namespace, "channel", "passwordReset", "p1")
    assert ack["phase"] == "Failed", ack
    assert "cannot set the password of 'debian'" in ack["message"] and "qemu-guest-agent" in ack["message"]
    reasons = [e.reason for e in core.list_namespaced_event(namespace).items if e.involved_object.uid == uid]
    assert "GuestAgentUnavailable" in reasons, reasons

    patch_spec(custom, namespace, "channel", {"powerState": "Stopped"})
    wait_ready(custom, namespace, "channel", power="Stopped")
    assert "guestAgent" not in (get(custom, namespace, "channel") or {})["status"], "cleared when it stops"
    delete_and_wait(custom, namespace, "channel")


def test_the_node_publishes_the_cpu_models_it_can_run_and_gives_one_exactly(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    models = eventually(lambda: node_models(custom, ground.node), timeout=60, what="status.cpuModels")
    assert "qemu64" in models, models
    assert NO_SUCH_MODEL not in models
    # a 64-bit model the test guest's kernel boots on, other than the default where the node has one
    chosen = next(m for m in ("Nehalem", "Westmere", "SandyBridge", "kvm64", "qemu64") if m in models)
    uid = create(custom, namespace, make("named", cpu={"model": chosen}, nodeName=ground.node))
    wait_ready(custom, namespace, "named")
    dom = domain(hypervisor, uid)
    assert dom is not None
    assert cpu_of(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == ("custom", chosen, "forbid")
    delete_and_wait(custom, namespace, "named")


def test_an_instance_whose_cpu_model_no_node_runs_stays_pending_with_its_reason(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    uid = create(custom, namespace, make("nocpu", cpu={"model": NO_SUCH_MODEL}))
    obj = eventually(
        lambda: (
            (o := get(custom, namespace, "nocpu")) and cond(o, "Scheduled").get("status") == "False" and o
        ),
        timeout=60,
        what="Scheduled=False",
    )
    scheduled = cond(obj, "Scheduled")
    assert obj["status"]["phase"] == "Pending" and scheduled["reason"] == "Unschedulable"
    assert f"CPU model '{NO_SUCH_MODEL}'" in scheduled["message"], scheduled
    assert NODE_LABEL not in (obj["metadata"].get("labels") or {})
    assert domain(hypervisor, uid) is None

    # Without the model, the same instance is placed and runs.
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, VIRTUALINSTANCES, "nocpu", {"spec": {"cpu": None}}
    )
    wait_ready(custom, namespace, "nocpu")
    delete_and_wait(custom, namespace, "nocpu")


@pytest.mark.parametrize("model", ["qemu64'/><qemu:commandline", "qemu64</model>", "a b", ""])
def test_the_api_refuses_a_cpu_model_that_is_no_model_name(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, model: str
) -> None:
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(custom, namespace, make("badcpu", cpu={"model": model}))
    assert refused.value.status == 422 and "spec.cpu.model" in str(refused.value.body)


def test_a_snapshot_of_a_guest_without_an_agent_says_it_is_crash_consistent_only(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    create(custom, namespace, make("snap", boot={"image": {"name": guest.DISK_IMAGE}}))
    wait_ready(custom, namespace, "snap")
    image = f"consistency-{namespace}.qcow2"
    patch_spec(custom, namespace, "snap", {"actions": {"snapshot": {"id": "s1", "imageName": image}}})
    ack = wait_action(custom, namespace, "snap", "snapshot", "s1", timeout=180)
    assert ack["phase"] == "Succeeded" and ack["consistent"] is False, ack
    assert "no QEMU guest agent answered" in ack["consistencyReason"], ack
    (ground.snapshots(namespace) / image).unlink()
    wait_ready(custom, namespace, "snap")  # resumed after the copy
    delete_and_wait(custom, namespace, "snap")
