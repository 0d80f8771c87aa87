"""PersistentVolumeClaims as volumes: the controller's checks and holder pods, the agent's waiting, and the
planner's refusal to move an instance that has one (a namespace user is trusted with nothing but its own
claims, and a claim serves one attachment unless it may be shared)."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest

from kubenova.driver.base import InvalidInstanceSpec
from kubenova.handlers.agent.claims import ClaimNotReady, Claims, mount_points, regular_disk, usable_bytes
from kubenova.handlers.controller.binding import Unschedulable
from kubenova.handlers.controller.holders import Holders, conflict, holder_name
from kubenova.handlers.controller.migration_planner import check_volumes
from kubenova.handlers.shared import NODE_LABEL, VOLUMEATTACHMENTS
from tests.unit.reconcile_fakes import FakeApiserver, condition


def va(name: str, instance: str, claim: str = "data", created: str = "1", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "generation": 1,
            "creationTimestamp": created,
            "labels": {NODE_LABEL: "node-0"},
        },
        "spec": {
            "instanceRef": {"name": instance},
            "volume": {"persistentVolumeClaim": {"claimName": claim}},
            **spec,
        },
    }


def test_a_read_write_once_claim_serves_one_attachment_and_the_older_keeps_it() -> None:
    first, second = va("a", "vm1", created="1"), va("b", "vm2", created="2")
    everyone = [first, second]
    assert conflict(first, ["ReadWriteOnce"], everyone) is None
    why = conflict(second, ["ReadWriteOnce"], everyone)
    assert why is not None and "'data'" in why and "'a'" in why and "vm1" in why and "detach it there" in why
    # Read-only on both sides changes nothing for a claim that is not ReadWriteMany or ReadOnlyMany.
    ro = [va("a", "vm1", created="1", readOnly=True), va("b", "vm2", created="2", readOnly=True)]
    assert conflict(ro[1], ["ReadWriteOnce"], ro) is not None
    # A failed or departing attachment, or one of another claim, holds nothing.
    failed = {**first, "status": {"phase": "Failed"}}
    assert conflict(second, ["ReadWriteOnce"], [failed, second]) is None
    assert conflict(second, ["ReadWriteOnce"], [va("a", "vm1", claim="other"), second]) is None


def test_a_read_write_many_claim_is_shared_only_read_only() -> None:
    ro = [va("a", "vm1", created="1", readOnly=True), va("b", "vm2", created="2", readOnly=True)]
    assert conflict(ro[1], ["ReadWriteMany"], ro) is None
    mixed = [va("a", "vm1", created="1"), va("b", "vm2", created="2", readOnly=True)]
    why = conflict(mixed[1], ["ReadWriteMany"], mixed)
    assert why is not None and "read-only in both" in why


class Controller:
    def __init__(self, image: str = "localhost/pause:1") -> None:
        self.api = FakeApiserver()
        self.holders = Holders(self.api, self.api, image)  # type: ignore[arg-type]

    def ensure(self, body: dict[str, Any]) -> dict[str, Any]:
        stored = self.api.add(VOLUMEATTACHMENTS, body)
        self.holders.ensure(stored)
        found = self.api.get(VOLUMEATTACHMENTS, "ns", body["metadata"]["name"])
        assert found is not None
        return found


def test_the_holder_pod_is_the_attachments_own_on_its_instances_node() -> None:
    c = Controller()
    c.api.add_claim("data")
    c.ensure(va("a", "vm1", readOnly=False))
    pod = c.api.pods[("ns", holder_name("a"))]
    # The attachment's status names its holder (only kubenova writes status): the agent uses no other pod.
    said = c.api.get(VOLUMEATTACHMENTS, "ns", "a") or {}
    assert said["status"]["holderPodUID"] == pod["metadata"]["uid"]
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "VolumeAttachment",
        "a",
        "uid-a",
        True,
    )
    term = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchFields"][0] == {
        "key": "metadata.name",
        "operator": "In",
        "values": ["node-0"],
    }
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "data", "readOnly": False}
    assert pod["spec"]["automountServiceAccountToken"] is False
    container = pod["spec"]["containers"][0]
    assert (
        container["image"] == "localhost/pause:1" and container["volumeMounts"][0]["mountPath"] == "/volume"
    )
    # A Block-mode claim's holder maps the device, and mounts nothing.
    c.api.add_claim("raw", mode="Block")
    c.ensure(va("r", "vm2", claim="raw"))
    mapped = c.api.pods[("ns", holder_name("r"))]["spec"]["containers"][0]
    assert mapped["volumeDevices"] == [{"name": "claim", "devicePath": "/dev/kubenova-volume"}]
    assert "volumeMounts" not in mapped


def test_a_missing_claim_waits_and_a_taken_one_fails_with_no_holder() -> None:
    c = Controller()
    body = c.ensure(va("a", "vm1"))
    assert body["status"]["phase"] == "Pending"
    assert condition(body, "Ready")["reason"] == "ClaimNotFound"
    assert "does not exist in namespace ns" in condition(body, "Ready")["message"]
    assert not c.api.pods
    c.api.add_claim("data")
    c.holders.ensure(body)  # the claim appeared: its watch wakes the attachment
    assert ("ns", holder_name("a")) in c.api.pods
    taken = c.ensure(va("b", "vm2", created="2"))
    assert taken["status"]["phase"] == "Failed" and taken["status"]["observedGeneration"] == 1
    assert condition(taken, "Ready")["reason"] == "ClaimInUse"
    assert ("ns", holder_name("b")) not in c.api.pods
    assert "ClaimInUse" in c.api.reasons("b")
    # Refused for good: once the claim is free, the failed attachment still gets no holder.
    c.api.objects.pop((VOLUMEATTACHMENTS, "ns", "a"))
    c.holders.ensure(taken)
    assert ("ns", holder_name("b")) not in c.api.pods


def test_a_pod_a_namespace_user_made_under_the_holders_name_is_not_taken_for_the_holder() -> None:
    c = Controller()
    c.api.add_claim("data")
    c.api.pods[("ns", holder_name("a"))] = {"metadata": {"name": holder_name("a"), "ownerReferences": []}}
    body = c.ensure(va("a", "vm1"))
    assert condition(body, "Ready")["reason"] == "HolderNameTaken" and "delete it" in str(body["status"])
    del c.api.pods[("ns", holder_name("a"))]
    c.holders.ensure(body)  # its deletion wakes the attachment (the holder_gone watch)
    owner = c.api.pods[("ns", holder_name("a"))]["metadata"]["ownerReferences"][0]
    assert owner["uid"] == "uid-a"
    c.holders.ensure(c.api.get(VOLUMEATTACHMENTS, "ns", "a") or {})  # made before: nothing more to say
    assert "HolderNameTaken" in c.api.reasons("a") and len(c.api.reasons("a")) == 1


def test_without_a_holder_image_claims_are_refused_with_the_setting_to_change() -> None:
    c = Controller(image="")
    c.api.add_claim("data")
    body = c.ensure(va("a", "vm1"))
    assert body["status"]["phase"] == "Failed"
    assert "controller.holderImage" in condition(body, "Ready")["message"] and not c.api.pods


def test_the_agent_waits_for_the_claim_to_exist_bind_and_be_mounted(tmp_path: pathlib.Path) -> None:
    api = FakeApiserver()
    claims = Claims(api, tmp_path)  # type: ignore[arg-type]
    holder = "0b5e6c1e-6a55-4d43-9f4e-2d1a3c0e9b11"
    reasons = []
    for step, uid in (
        ("no holder yet", ""),
        ("forged", "../../etc"),
        ("missing", holder),
        ("Pending", holder),
        ("Bound", holder),
    ):
        if step in ("Pending", "Bound"):
            api.add_claim("data", phase=step)
        with pytest.raises(ClaimNotReady) as waits:
            claims.disk("ns", "data", False, {"holderPodUID": uid})
        reasons.append(waits.value.reason)
    assert reasons == ["HolderPending", "HolderPending", "ClaimNotFound", "ClaimPending", "ClaimNotMounted"]
    # A folder of that name that is no mount is not the volume: nothing is made in it.
    folder = tmp_path / "pods" / holder / "volumes" / "kubernetes.io~local-volume" / "pv-data"
    folder.mkdir(parents=True)
    with pytest.raises(ClaimNotReady):
        claims.disk("ns", "data", False, {"holderPodUID": holder})
    assert not any(folder.iterdir())


def test_a_disk_image_a_namespace_user_swapped_for_a_link_is_refused(tmp_path: pathlib.Path) -> None:
    """A pod of the namespace that mounts the claim too may put a link where the disk was; libvirtd would
    follow it on the host (another namespace's volume, a host file)."""
    secret = tmp_path / "another-namespaces-volume"
    secret.write_bytes(b"theirs")
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / "disk.img").symlink_to(secret)
    with pytest.raises(InvalidInstanceSpec, match="not a plain file"):
        regular_disk(mount, "data")
    (mount / "disk.img").unlink()
    os.link(secret, mount / "disk.img")  # a hard link: the same bytes under two names
    with pytest.raises(InvalidInstanceSpec, match="not a plain file"):
        regular_disk(mount, "data")
    (mount / "disk.img").unlink()
    (mount / "disk.img").write_bytes(b"ours")
    assert regular_disk(mount, "data") == str(mount / "disk.img")


def test_mount_points_are_read_from_mountinfo_with_its_escapes(tmp_path: pathlib.Path) -> None:
    """Bind mounts of a folder of the same file system (local PersistentVolumes) are mounts too."""
    info = tmp_path / "mountinfo"
    info.write_text(
        "243 230 254:0 /srv/pv-a /var/lib/kubelet/pods/u/volumes/p~local/pv-a rw - ext4 x rw\n"
        "244 230 254:0 /srv/b /mnt/with\\040space rw - ext4 /dev/vda rw\n"
    )
    assert mount_points(str(info)) == {
        "/var/lib/kubelet/pods/u/volumes/p~local/pv-a",
        "/mnt/with space",
    }


def test_the_disk_image_leaves_the_file_systems_share_of_the_claim() -> None:
    assert usable_bytes("1Gi") == int(2**30 * 0.945) // 2**20 * 2**20
    assert usable_bytes("1Mi") == 0


@pytest.mark.parametrize(
    ("modes", "said"),
    [(["ReadWriteOnce"], "usable on one node at a time"), (["ReadWriteMany"], "does not move an instance")],
)
def test_an_instance_with_a_claim_does_not_move_and_the_refusal_names_the_claim_and_the_fix(
    modes: list[str], said: str
) -> None:
    attachment = {**va("disk", "vm"), "status": {"phase": "Attached"}}
    for kind in ("Live", "Cold"):
        with pytest.raises(Unschedulable) as refused:
            check_volumes(kind, "vm", [attachment], lambda claim: modes)
        text = str(refused.value)
        assert "'disk'" in text and "'data'" in text and said in text and "attach the claim again" in text
