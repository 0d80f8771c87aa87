"""The attachment reconciler (VolumeAgent) against FakeDriver and an in-memory apiserver: waiting for the
instance's domain, hot attach, a spec that cannot attach, a busy volume, and detach on delete."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from kubenova.handlers.agent.claims import Claims
from kubenova.handlers.agent.events import EventPoster
from kubenova.handlers.agent.volumes import VolumeAgent
from kubenova.handlers.shared import VOLUMEATTACHMENTS
from tests.unit.agent_harness import NODE, Node, make_node
from tests.unit.reconcile_fakes import MemoryStatusWriter, bound, condition


class Volumes:
    """The node's attachment reconciler beside its instance reconciler, on one apiserver and driver."""

    def __init__(self, node: Node, kubelet: pathlib.Path) -> None:
        self.node = node
        self.cache = node.volumes
        self.agent = VolumeAgent(
            NODE,
            node.driver,
            node.api,  # type: ignore[arg-type]
            MemoryStatusWriter(node.api, VOLUMEATTACHMENTS),
            EventPoster(node.api, NODE),  # type: ignore[arg-type]
            node.volumes,
            node.cache,
            Claims(node.api, kubelet),  # type: ignore[arg-type]
        )

    def attach(self, name: str, instance: str, **spec: Any) -> str:
        body = bound(name, NODE, {"instanceRef": {"name": instance}, **spec})
        return self.look(self.node.api.add(VOLUMEATTACHMENTS, body))

    def look(self, body: dict[str, Any]) -> str:
        uid = self.cache.seen(None, body)  # read fresh: current
        self.agent.handle(uid)
        return uid

    def get(self, name: str) -> dict[str, Any]:
        found = self.node.api.get(VOLUMEATTACHMENTS, "ns", name)
        assert found is not None, f"{name} is gone"
        return found


@pytest.fixture
def volumes(tmp_path: pathlib.Path) -> Volumes:
    return Volumes(make_node(tmp_path), tmp_path / "kubelet")


def test_an_attachment_waits_for_its_instance_then_attaches_once_the_domain_exists(volumes: Volumes) -> None:
    uid = volumes.attach("data", "vm", volume={"name": "data", "sizeGiB": 1})
    body = volumes.get("data")
    assert body["status"]["phase"] == "Pending"
    assert condition(body, "Ready")["reason"] == "InstanceNotReady"

    instance = volumes.node.create("vm")
    assert ("volume", uid) in volumes.node.queue.added  # the instance's domain asked for the look
    volumes.look(volumes.get("data"))
    body = volumes.get("data")
    status = body["status"]
    assert (status["phase"], status["node"], status["observedGeneration"]) == ("Attached", NODE, 1)
    assert status["device"] in volumes.node.driver.list_disks(instance)
    assert status["connector"]["host"] == volumes.node.driver.hostname
    assert condition(body, "Ready")["status"] == "True"


def test_an_image_attaches_read_only_on_the_bus_asked_for(volumes: Volumes) -> None:
    instance = volumes.node.create("vm")
    volumes.attach("iso", "vm", image={"name": "disk.img"}, device={"bus": "scsi"}, readOnly=True)
    device = volumes.get("iso")["status"]["device"]
    assert device.startswith("sd") and device in volumes.node.driver.list_disks(instance)


def test_a_device_name_in_use_fails_with_the_field_named(volumes: Volumes) -> None:
    volumes.node.create("vm")
    volumes.attach("one", "vm", volume={"name": "one", "sizeGiB": 1}, device={"name": "vdz"})
    volumes.attach("two", "vm", volume={"name": "two", "sizeGiB": 1}, device={"name": "vdz"})
    body = volumes.get("two")
    assert body["status"]["phase"] == "Failed" and body["status"]["observedGeneration"] == 1
    ready = condition(body, "Ready")
    assert ready["reason"] == "InvalidSpec" and "spec.device.name" in ready["message"]


def test_a_volume_attached_elsewhere_is_retried_and_said(volumes: Volumes) -> None:
    volumes.node.create("vm")
    volumes.node.create("other")
    volumes.attach("first", "vm", volume={"name": "shared", "sizeGiB": 1})
    uid = volumes.attach("second", "other", volume={"name": "shared"})
    body = volumes.get("second")
    assert body["status"]["phase"] == "Attaching"
    assert condition(body, "Ready")["reason"] == "HypervisorError"
    assert ("volume", uid) in volumes.node.queue.retried
    assert "AttachFailed" in volumes.node.api.reasons("second")


def test_deleting_an_attachment_detaches_it_then_lets_it_go(volumes: Volumes) -> None:
    instance = volumes.node.create("vm")
    volumes.attach("data", "vm", volume={"name": "data", "sizeGiB": 1})
    device = volumes.get("data")["status"]["device"]
    stored = volumes.node.api.objects[(VOLUMEATTACHMENTS, "ns", "data")]
    stored["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    volumes.look(volumes.node.api.touch(stored))
    assert device not in volumes.node.driver.list_disks(instance)
    assert volumes.node.api.get(VOLUMEATTACHMENTS, "ns", "data") is None


def test_an_attachment_whose_instance_is_gone_is_let_go_on_delete(volumes: Volumes) -> None:
    volumes.attach("data", "vm", volume={"name": "data", "sizeGiB": 1})
    stored = volumes.node.api.objects[(VOLUMEATTACHMENTS, "ns", "data")]
    stored["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    volumes.look(volumes.node.api.touch(stored))
    assert volumes.node.api.get(VOLUMEATTACHMENTS, "ns", "data") is None


def test_an_attachment_says_its_size_and_a_moved_one_is_said_attached_on_its_new_node(
    volumes: Volumes,
) -> None:
    volumes.node.create("vm")
    volumes.attach("data", "vm", volume={"name": "data", "sizeGiB": 1})
    status = volumes.get("data")["status"]
    assert status["sizeBytes"] == 2**30, "a live migration's target makes a copy of this size"
    # As a migration leaves it: Attached, said by the node it came from; this node's look says it is here.
    stored = volumes.node.api.objects[(VOLUMEATTACHMENTS, "ns", "data")]
    stored["status"]["node"] = "elsewhere"
    volumes.look(volumes.node.api.touch(stored))
    assert (volumes.get("data")["status"]["node"], volumes.get("data")["status"]["phase"]) == (
        NODE,
        "Attached",
    )


def test_a_claim_that_is_not_on_the_node_yet_keeps_the_attachment_pending_and_attaches_nothing(
    volumes: Volumes,
) -> None:
    instance = volumes.node.create("vm")
    disks = volumes.node.driver.list_disks(instance)
    volumes.node.api.add_claim("data", phase="Pending")
    volumes.attach("pvc", "vm", volume={"persistentVolumeClaim": {"claimName": "data"}})
    assert condition(volumes.get("pvc"), "Ready")["reason"] == "HolderPending"  # the controller's pod first
    holder = {"holderPodUID": "0b5e6c1e-6a55-4d43-9f4e-2d1a3c0e9b11"}
    body = volumes.get("pvc")
    body["status"].update(holder)  # what the controller writes once it made the pod
    volumes.look(volumes.node.api.touch(body))
    body = volumes.get("pvc")
    assert body["status"]["phase"] == "Pending" and condition(body, "Ready")["reason"] == "ClaimPending"
    assert "kubectl -n ns describe pvc data" in condition(body, "Ready")["message"]
    assert volumes.node.driver.list_disks(instance) == disks
    assert volumes.node.api.reasons("pvc") == ["HolderPending", "ClaimPending"]
    volumes.look(volumes.get("pvc"))  # the same wait again: no second Event
    assert volumes.node.api.reasons("pvc") == ["HolderPending", "ClaimPending"]
