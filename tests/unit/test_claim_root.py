"""A root disk in a PersistentVolumeClaim: the controller's holder pod for the instance, a claim that an
attachment and a root disk cannot both have, the agent's finding the disk, the driver's making it from the
image, and the refusals to move such an instance (its disk is where its claim's storage is)."""

from __future__ import annotations

import os
import pathlib
import stat
from typing import Any

import pytest

from kubenova.driver.base import InvalidInstanceSpec
from kubenova.driver.libvirt import imagecache
from kubenova.driver.libvirt.config import GuestDisk
from kubenova.driver.libvirt.volumes import device_size
from kubenova.handlers.agent import claims as agent_claims
from kubenova.handlers.agent.claims import DISK_IMAGE, ClaimNotReady, Claims, usable_bytes
from kubenova.handlers.controller.binding import Unschedulable
from kubenova.handlers.controller.fencing import why_kept
from kubenova.handlers.controller.holders import INSTANCE_LABEL, MANAGED_BY, Holders, conflict, holder_name
from kubenova.handlers.controller.migration_planner import check_volumes
from kubenova.handlers.shared import NODE_LABEL, VIRTUALINSTANCES
from tests.unit.reconcile_fakes import FakeApiserver, condition
from tests.unit.test_claims import va

INSTANCE = "VirtualInstance"
HOLDER = "0b5e6c1e-6a55-4d43-9f4e-2d1a3c0e9b11"


def vi(name: str, claim: str = "data", created: str = "1", uid: str = "", **status: Any) -> dict[str, Any]:
    return {
        "kind": INSTANCE,
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": uid or f"uid-{name}",
            "generation": 1,
            "creationTimestamp": created,
            "labels": {NODE_LABEL: "node-0"},
        },
        "spec": {"rootDisk": {"persistentVolumeClaim": {"claimName": claim}}},
        "status": status,
    }


def controller() -> tuple[FakeApiserver, Holders]:
    api = FakeApiserver()
    return api, Holders(api, api, "localhost/pause:1")  # type: ignore[arg-type]


def ensured(api: FakeApiserver, holders: Holders, body: dict[str, Any]) -> dict[str, Any]:
    holders.ensure(api.add(VIRTUALINSTANCES, body))
    return {"kind": INSTANCE, **(api.get(VIRTUALINSTANCES, "ns", body["metadata"]["name"]) or {})}


def test_an_instances_root_claim_gets_a_holder_of_its_own_named_in_its_status() -> None:
    api, holders = controller()
    api.add_claim("data")
    said = ensured(api, holders, vi("vm"))
    pod = api.pods[("ns", "kubenova-root-vm")]
    assert holder_name("vm", INSTANCE) == "kubenova-root-vm"
    assert said["status"]["holderPodUID"] == pod["metadata"]["uid"]
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == (INSTANCE, "vm", "uid-vm")
    assert pod["metadata"]["labels"] == {INSTANCE_LABEL: "vm", MANAGED_BY: "kubenova"}
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "data", "readOnly": False}
    # Named once: later events of the instance (its agent's status writes) ask the apiserver nothing more.
    api.pods.clear()
    holders.ensure(said)
    assert not api.pods


def test_an_attachment_and_a_root_disk_do_not_share_a_claim_and_the_older_keeps_it() -> None:
    disk, volume = vi("vm", created="1"), {**va("a", "other", created="2"), "kind": "VolumeAttachment"}
    everyone = [disk, volume]
    assert conflict(disk, ["ReadWriteOnce"], everyone) is None
    why = conflict(volume, ["ReadWriteOnce"], everyone) or ""
    assert "the root disk of VirtualInstance 'vm'" in why and "delete that instance first" in why
    # The other way round, and with a claim that may be shared: a root disk is never read-only.
    older, younger = {**va("a", "other", created="1"), "kind": "VolumeAttachment"}, vi("vm", created="2")
    why = conflict(younger, ["ReadWriteMany"], [older, younger]) or ""
    assert "VolumeAttachment 'a' of VirtualInstance 'other'" in why and "read-only in both" in why
    # An instance the controller refused holds nothing; one that failed for another reason still does.
    refused = vi("vm", conditions=[{"type": "Ready", "status": "False", "reason": "ClaimInUse"}])
    assert conflict(volume, ["ReadWriteOnce"], [refused, volume]) is None
    failed = vi(
        "vm", phase="Failed", conditions=[{"type": "Ready", "status": "False", "reason": "InvalidSpec"}]
    )
    assert conflict(volume, ["ReadWriteOnce"], [failed, volume]) is not None


def test_an_instance_waiting_for_its_claim_keeps_its_phase_and_a_refusal_is_for_good() -> None:
    api, holders = controller()
    waiting = ensured(api, holders, vi("vm", phase="Scheduled"))
    assert waiting["status"]["phase"] == "Scheduled"  # the agent's word: placed, not created yet
    assert condition(waiting, "Ready")["reason"] == "ClaimNotFound" and api.reasons("vm") == ["ClaimNotFound"]
    api.add(VIRTUALINSTANCES, vi("first", created="0"))
    api.add_claim("data")
    holders.ensure(waiting)  # the claim's watch
    refused = {"kind": INSTANCE, **(api.get(VIRTUALINSTANCES, "ns", "vm") or {})}
    assert refused["status"]["phase"] == "Failed" and condition(refused, "Ready")["reason"] == "ClaimInUse"
    assert "the root disk of VirtualInstance 'first'" in condition(refused, "Ready")["message"]
    api.objects.pop((VIRTUALINSTANCES, "ns", "first"))
    holders.ensure(refused)
    assert ("ns", "kubenova-root-vm") not in api.pods


def test_an_instance_made_again_under_its_name_gets_its_holder_once_the_old_one_is_gone() -> None:
    """Deleted and made again at once (GitOps): the garbage collector may not have taken the old holder."""
    api, holders = controller()
    api.add_claim("data")
    ensured(api, holders, vi("vm", uid="old"))
    old = api.pods[("ns", "kubenova-root-vm")]
    api.objects.pop((VIRTUALINSTANCES, "ns", "vm"))
    again = ensured(api, holders, vi("vm", uid="new"))
    assert condition(again, "Ready")["reason"] == "HolderNameTaken" and "holderPodUID" not in again["status"]
    del api.pods[("ns", "kubenova-root-vm")]
    holders.holder_gone("DELETED", "ns", old)  # type: ignore[arg-type]
    made = api.pods[("ns", "kubenova-root-vm")]
    assert made["metadata"]["ownerReferences"][0]["uid"] == "new"
    assert (api.get(VIRTUALINSTANCES, "ns", "vm") or {})["status"]["holderPodUID"] == made["metadata"]["uid"]


def test_the_agent_finds_the_root_disk_in_its_holders_mount(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeApiserver()
    claims = Claims(api, tmp_path)  # type: ignore[arg-type]
    assert claims.root({**vi("vm"), "spec": {}}) is None
    # No holder yet, and the controller said why: the agent says the same, not a second story.
    said = {"type": "Ready", "status": "False", "reason": "ClaimNotFound", "message": "create it"}
    with pytest.raises(ClaimNotReady) as waits:
        claims.root(vi("vm", conditions=[said]))
    assert (waits.value.reason, str(waits.value)) == ("ClaimNotFound", "create it")
    api.add_claim("data")
    mount = tmp_path / "pods" / HOLDER / "volumes" / "kubernetes.io~local-volume" / "pv-data"
    mount.mkdir(parents=True)
    monkeypatch.setattr(agent_claims, "mount_points", lambda: {str(mount)})
    found = claims.root(vi("vm", holderPodUID=HOLDER))
    assert found == (str(mount / DISK_IMAGE), usable_bytes("1Gi"))  # the driver makes it there
    assert not (mount / DISK_IMAGE).exists()
    (mount / DISK_IMAGE).symlink_to("/etc/shadow")  # planted by a pod of the namespace that mounts the claim
    with pytest.raises(InvalidInstanceSpec, match="spec.rootDisk.persistentVolumeClaim"):
        claims.root(vi("vm", holderPodUID=HOLDER))


def test_the_driver_makes_the_disk_from_the_image_grown_to_the_claim_or_refuses_a_claim_too_small(
    tmp_path: pathlib.Path,
) -> None:
    raw, base = tmp_path / "image.raw", tmp_path / "image.qcow2"
    raw.write_bytes(b"BOOT" * 256 + bytes(2**20 - 1024))
    imagecache.qemu_img("convert", "-O", "qcow2", str(raw), str(base))
    disk = tmp_path / "claim" / DISK_IMAGE
    disk.parent.mkdir()
    imagecache.make_raw(disk, 4 * 2**20, base)
    assert disk.stat().st_size == 4 * 2**20 and disk.read_bytes()[:8] == b"BOOTBOOT"
    assert imagecache.info(disk)["format"] == "raw"
    with pytest.raises(InvalidInstanceSpec, match="spec.rootDisk.persistentVolumeClaim.*use a larger claim"):
        imagecache.make_raw(tmp_path / "claim" / "small.img", 2**19, base)
    assert sorted(p.name for p in disk.parent.iterdir()) == [DISK_IMAGE], "nothing half-made is left"
    empty = tmp_path / "claim" / "empty.img"
    imagecache.make_raw(empty, 2**20, None)
    assert empty.read_bytes() == bytes(2**20)


def test_an_instance_whose_root_disk_is_a_claim_neither_migrates_nor_restarts_elsewhere() -> None:
    for kind in ("Live", "Cold"):
        with pytest.raises(Unschedulable, match="'vm' boots from PersistentVolumeClaim 'data'"):
            check_volumes(kind, "vm", [], root_claim="data")
    kept = why_kept(vi("vm"), set(), set(), "node-0") or ""
    assert "PersistentVolumeClaim 'data'" in kept and "bring the node back" in kept


def test_a_holder_gone_wakes_no_instance_of_its_name_that_has_no_claim() -> None:
    api, holders = controller()
    api.add_claim("data")
    ensured(api, holders, vi("vm", uid="old"))
    old = api.pods.pop(("ns", "kubenova-root-vm"))
    api.objects.pop((VIRTUALINSTANCES, "ns", "vm"))
    api.add(VIRTUALINSTANCES, {**vi("vm", uid="new"), "spec": {}})  # made again, booting a local disk
    holders.holder_gone("DELETED", "ns", old)  # type: ignore[arg-type]
    assert not api.pods and not api.reasons("vm"), "nothing made, nothing said"


def test_a_block_mode_claim_is_no_root_disk_but_its_device_is_a_volume(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api, holders = controller()
    api.add_claim("raw", mode="Block")
    refused = ensured(api, holders, vi("vm", claim="raw"))
    assert condition(refused, "Ready")["reason"] == "BlockModeNotSupported" and not api.pods
    # As a volume: the device the kubelet bind-mounted for the holder, in its folder (not the pod's link).
    claims = Claims(api, tmp_path)  # type: ignore[arg-type]
    plugins = tmp_path / "plugins" / "kubernetes.io~local-volume" / "volumeDevices" / "pv-raw"
    plugins.mkdir(parents=True)
    device = plugins / HOLDER
    os.mknod(device, 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    monkeypatch.setattr(agent_claims, "mount_points", lambda: set())
    with pytest.raises(ClaimNotReady) as waits:
        claims.disk("ns", "raw", False, {"holderPodUID": HOLDER})
    assert waits.value.reason == "ClaimNotMounted", "a device node that is no mount is not the volume"
    monkeypatch.setattr(agent_claims, "mount_points", lambda: {str(device)})
    assert claims.disk("ns", "raw", False, {"holderPodUID": HOLDER}) == str(device)
    # The driver names it as a block device, and reads its size from sysfs (0 when sysfs does not say).
    disk = GuestDisk(source=str(device), target="vdb", driver_type="raw", block=True)
    xml = disk.to_xml()
    assert 'type="block"' in xml and f'dev="{device}"' in xml
    assert GuestDisk.parse_dom(disk.format_dom()) == disk
    assert device_size(os.makedev(250, 250)) == 0
