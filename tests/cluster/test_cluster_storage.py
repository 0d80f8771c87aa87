"""PersistentVolumeClaims on a real node, as a VM's volume and as its root disk: the cluster's provisioner
(local-path) makes the volume, the kubelet mounts it for a holder pod, the guest writes to it; the bytes
stay in the volume after the attachment (or instance) goes, with its holder pod, and another instance
finds them.

A second user of the same ReadWriteOnce claim, while the first holds it, fails with the claim's name and
the fix, and no holder pod is made for it; so does a root disk claim too small for the image. A Block-mode
claim (a local PersistentVolume over a loop device) is attached as the device itself.
"""

from __future__ import annotations

import pathlib
import subprocess
import uuid
from typing import Any

import kubernetes
import pytest

from kubenova.handlers.agent.claims import DISK_IMAGE, usable_bytes
from kubenova.handlers.controller.holders import ATTACHMENT_LABEL, INSTANCE_LABEL, holder_name
from kubenova.handlers.shared import GROUP, VERSION, VIRTUALINSTANCES, VOLUMEATTACHMENTS
from testground import cluster, cluster_storage, guest, kube
from testground import ground as testground
from tests.cluster.test_cluster_mode import ready_pod
from tests.helpers import REPORT, eventually
from tests.integration.test_agent import attach, console_text, delete_and_wait, wait_action, wait_ready
from tests.integration.test_virtualinstance import make

pytestmark = pytest.mark.cluster
BOOT = 180


def phase(
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    name: str,
    *wanted: str,
    plural: str = VOLUMEATTACHMENTS,
) -> dict[str, Any]:
    """The attachment (or with ``plural``, the instance) once its phase is one of ``wanted``."""

    def found() -> Any:
        body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        return body.get("status", {}).get("phase") in wanted and body

    return eventually(found, timeout=BOOT, what=f"{plural} {name} {' or '.join(wanted)}")


def holders(core: kubernetes.client.CoreV1Api, namespace: str, label: str = ATTACHMENT_LABEL) -> list[str]:
    """The holder pods of the namespace's attachments (or, by INSTANCE_LABEL, of its root disks), but those
    going."""
    return [
        p.metadata.name
        for p in core.list_namespaced_pod(namespace, label_selector=label).items
        if not p.metadata.deletion_timestamp
    ]


@pytest.fixture(scope="module")
def kubenova(ground: testground.Ground, core: kubernetes.client.CoreV1Api) -> None:
    """kubenova installed by its chart, once for this module's tests."""
    cluster.helm_install(ground.layout, kube.build_helm(), ground.env(), ground.node, ground.image_store)
    ready_pod(core, "agent")
    ready_pod(core, "controller")


def kernel_vm(name: str, *hooks: str) -> dict[str, Any]:
    cmdline = " ".join([guest.CMDLINE, *hooks])
    return make(name, boot={"kernel": {"image": guest.KERNEL, "initrd": guest.INITRD, "cmdline": cmdline}})


def test_a_claims_bytes_outlive_their_attachment_and_another_instance_reads_them(
    ground: testground.Ground,
    kubenova: None,
    core: kubernetes.client.CoreV1Api,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
) -> None:
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}},
        },
    )
    pattern = f"PVC-{uuid.uuid4().hex[:8]}"
    # The guest names disks in the order it finds them: with no disk of its own, the claim is its vda.
    for name, hooks in (("writer", [guest.write_hook("vda", pattern)]), ("reader", [])):
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, VIRTUALINSTANCES, kernel_vm(name, *hooks)
        )
    writer = wait_ready(custom, namespace, "writer", timeout=BOOT)["metadata"]["uid"]
    reader = wait_ready(custom, namespace, "reader", timeout=BOOT)["metadata"]["uid"]
    claim = {"persistentVolumeClaim": {"claimName": "data"}}

    # The claim is provisioned for the holder pod (WaitForFirstConsumer), mounted, and hot-plugged.
    attach(custom, namespace, "data-w", "writer", volume=claim, device={"name": "vdb"})
    attached = phase(custom, namespace, "data-w", "Attached", "Failed")["status"]
    assert attached["phase"] == "Attached", attached
    assert holders(core, namespace) == [holder_name("data-w")]
    pod = core.read_namespaced_pod(holder_name("data-w"), namespace)
    assert pod.spec.node_name == ground.node and pod.metadata.owner_references[0].name == "data-w"
    eventually(
        lambda: f"{guest.WROTE} vda {pattern}" in console_text(ground, writer),
        timeout=BOOT,
        what="the guest to write its pattern to the claim",
    )
    capacity = core.read_namespaced_persistent_volume_claim("data", namespace).status.capacity["storage"]
    assert attached["sizeBytes"] == usable_bytes(capacity)

    # ReadWriteOnce: one attachment at a time; the second is refused, with no holder pod.
    attach(custom, namespace, "data-r", "reader", volume=claim)
    refused = phase(custom, namespace, "data-r", "Failed")["status"]
    message = refused["conditions"][-1]["message"]
    assert "'data'" in message and "'data-w'" in message and "detach it there first" in message, message
    assert holders(core, namespace) == [holder_name("data-w")]
    delete_and_wait(custom, namespace, "data-r", VOLUMEATTACHMENTS)

    # Detached: the holder goes (the garbage collector, after the agent's detach); the bytes stay.
    delete_and_wait(custom, namespace, "data-w", VOLUMEATTACHMENTS)
    eventually(lambda: not holders(core, namespace), timeout=60, what="the holder pod to go")
    folder = cluster_storage.claim_folder(ground.tools / "kubectl", ground.env(), namespace, "data")
    assert folder.is_relative_to(cluster_storage.volumes_dir(ground.layout)), "the provisioner's volume"
    with open(folder / DISK_IMAGE, "rb") as f:
        assert f.read(len(pattern)) == pattern.encode(), "the guest's bytes are in the provisioned volume"

    # Another instance gets the claim and reads the bytes at its next boot.
    attach(custom, namespace, "data-r2", "reader", volume=claim, device={"name": "vdb"})
    assert phase(custom, namespace, "data-r2", "Attached", "Failed")["status"]["phase"] == "Attached"
    custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        VIRTUALINSTANCES,
        "reader",
        {"spec": {"actions": {"reboot": {"id": "read", "type": "Hard"}}}},
    )
    assert wait_action(custom, namespace, "reader", "reboot", "read")["phase"] == "Succeeded"
    head = pattern.encode().ljust(16, bytes(1)).hex()
    eventually(
        lambda: (
            f"{guest.DISK} vda sectors=" in console_text(ground, reader)
            and f"head={head}" in console_text(ground, reader)
        ),
        timeout=BOOT,
        what="the second instance to read the pattern from the claim",
    )
    delete_and_wait(custom, namespace, "data-r2", VOLUMEATTACHMENTS)
    for name in ("writer", "reader"):
        delete_and_wait(custom, namespace, name)
    eventually(lambda: not holders(core, namespace), timeout=60, what="the last holder pod to go")
    REPORT.append(f"cluster storage: claim {capacity} in {folder}, pattern read back by a second instance")


def disk_line(ground: testground.Ground, uid: str) -> str:
    """The guest's ``DISK vda sectors=<n> head=<hex>`` line: its root disk as it found it at boot."""
    return eventually(
        lambda: next(
            (line for line in console_text(ground, uid).splitlines() if f"{guest.DISK} vda " in line), ""
        ),
        timeout=BOOT,
        what="the guest to read its root disk",
    )


def booting_from_claim(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str, claim: str, boot: dict[str, Any]
) -> None:
    body = make(name, boot=boot, rootDisk={"persistentVolumeClaim": {"claimName": claim}})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)


def test_a_vm_boots_from_a_claim_and_the_next_instance_of_that_claim_finds_the_disk_as_it_was_left(
    ground: testground.Ground,
    kubenova: None,
    core: kubernetes.client.CoreV1Api,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
) -> None:
    for claim, size in (("root", "128Mi"), ("tiny", "32Mi")):
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": claim},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
            },
        )

    # Booted from the claim: disk.img made there from the image, grown to the claim less the file system's.
    booting_from_claim(custom, namespace, "vm", "root", {"image": {"name": guest.DISK_IMAGE}})
    first = wait_ready(custom, namespace, "vm", timeout=BOOT)
    eventually(lambda: guest.BOOT_MARKER in console_text(ground, first["metadata"]["uid"]), timeout=BOOT)
    capacity = core.read_namespaced_persistent_volume_claim("root", namespace).status.capacity["storage"]
    booted = disk_line(ground, first["metadata"]["uid"])
    assert f"sectors={usable_bytes(capacity) // 512} " in booted, booted
    head = booted.rsplit("head=", 1)[1]
    assert head != "00" * 16, "the image's boot sector"
    pod = core.read_namespaced_pod(holder_name("vm", "VirtualInstance"), namespace)
    assert pod.metadata.owner_references[0].kind == "VirtualInstance" and pod.spec.node_name == ground.node
    assert first["status"]["holderPodUID"] == pod.metadata.uid

    # ReadWriteOnce: a second instance of the claim is refused, and gets no holder.
    booting_from_claim(custom, namespace, "other", "root", {"image": {"name": guest.DISK_IMAGE}})
    refused = phase(custom, namespace, "other", "Failed", plural=VIRTUALINSTANCES)["status"]["conditions"]
    assert any(
        "'root'" in c["message"] and "the root disk of VirtualInstance 'vm'" in c["message"] for c in refused
    )
    # A claim too small for the image: refused with the field and the fix, nothing made in it.
    booting_from_claim(custom, namespace, "small", "tiny", {"image": {"name": guest.DISK_IMAGE}})
    failed = phase(custom, namespace, "small", "Failed", plural=VIRTUALINSTANCES)["status"]["conditions"]
    assert any(
        "spec.rootDisk.persistentVolumeClaim" in c["message"] and "larger claim" in c["message"]
        for c in failed
    )
    assert sorted(holders(core, namespace, INSTANCE_LABEL)) == sorted(
        holder_name(n, "VirtualInstance") for n in ("vm", "small")
    )
    for name in ("other", "small"):
        delete_and_wait(custom, namespace, name)

    # Deleted: its holder goes, the disk stays in the provisioned volume.
    delete_and_wait(custom, namespace, "vm")
    eventually(
        lambda: not holders(core, namespace, INSTANCE_LABEL), timeout=60, what="the root holder pod to go"
    )
    folder = cluster_storage.claim_folder(ground.tools / "kubectl", ground.env(), namespace, "root")
    with open(folder / DISK_IMAGE, "rb") as f:
        assert f.read(16).hex() == head, "the disk is in the provisioned volume"

    # Made again under the same name (its holder waits for the old one's to go), with a kernel boot that
    # makes nothing from an image: the guest finds the disk the last one left, then writes to it.
    pattern = f"ROOT-{uuid.uuid4().hex[:8]}"
    booting_from_claim(
        custom, namespace, "vm", "root", kernel_vm("x", guest.write_hook("vda", pattern))["spec"]["boot"]
    )
    again = wait_ready(custom, namespace, "vm", timeout=BOOT)["metadata"]["uid"]
    assert disk_line(ground, again).endswith(f"head={head}"), "the data the last instance left"
    eventually(lambda: f"{guest.WROTE} vda {pattern}" in console_text(ground, again), timeout=BOOT)
    delete_and_wait(custom, namespace, "vm")
    with open(folder / DISK_IMAGE, "rb") as f:
        assert f.read(len(pattern)) == pattern.encode(), "the guest's write is in the provisioned volume"
    eventually(
        lambda: not holders(core, namespace, INSTANCE_LABEL),
        timeout=60,
        what="the last root holder pod to go",
    )
    REPORT.append(f"cluster storage: root disk in claim {capacity}, booted, kept across delete and re-create")


def block_volume(
    core: kubernetes.client.CoreV1Api, node: str, namespace: str, backing: str
) -> tuple[str, str]:
    """A Block-mode local PersistentVolume of node ``node`` over a loop device of the file ``backing`` (the
    provisioner has no Block mode), in the class ``kubenova-block`` only ``namespace``'s claim asks for;
    its name and the device."""
    with open(backing, "wb") as f:
        f.truncate(32 * 2**20)
    device = subprocess.run(
        ["losetup", "--find", "--show", backing], capture_output=True, text=True, check=True
    ).stdout.strip()
    name = f"kubenova-block-{namespace}"
    term = {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}
    core.create_persistent_volume(
        {
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "32Mi"},
                "volumeMode": "Block",
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "kubenova-block",
                "claimRef": {"namespace": namespace, "name": "raw"},
                "local": {"path": device},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [term]}},
            },
        }
    )
    return name, device


def test_a_block_mode_claim_is_attached_as_the_device_and_the_guests_bytes_are_on_it(
    ground: testground.Ground,
    kubenova: None,
    core: kubernetes.client.CoreV1Api,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    pv, device = block_volume(core, ground.node, namespace, str(tmp_path / "backing"))
    try:
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": "raw"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "volumeMode": "Block",
                    "storageClassName": "kubenova-block",
                    "resources": {"requests": {"storage": "32Mi"}},
                },
            },
        )
        pattern = f"BLK-{uuid.uuid4().hex[:8]}"
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, VIRTUALINSTANCES, kernel_vm("vm", guest.write_hook("vda", pattern))
        )
        uid = wait_ready(custom, namespace, "vm", timeout=BOOT)["metadata"]["uid"]
        attach(custom, namespace, "raw", "vm", volume={"persistentVolumeClaim": {"claimName": "raw"}})
        attached = phase(custom, namespace, "raw", "Attached", "Failed")["status"]
        assert attached["phase"] == "Attached", attached
        assert attached["sizeBytes"] == 32 * 2**20, "the device's own size"
        holder = core.read_namespaced_pod(holder_name("raw"), namespace).spec.containers[0]
        assert holder.volume_devices[0].device_path == "/dev/kubenova-volume" and not holder.volume_mounts
        eventually(
            lambda: f"{guest.WROTE} vda {pattern}" in console_text(ground, uid),
            timeout=BOOT,
            what="the guest to write its pattern to the device",
        )
        delete_and_wait(custom, namespace, "raw", VOLUMEATTACHMENTS)
        eventually(lambda: not holders(core, namespace), timeout=60, what="the holder pod to go")
        with open(tmp_path / "backing", "rb") as f:
            assert f.read(len(pattern)) == pattern.encode(), "the guest's bytes are on the claim's device"
        delete_and_wait(custom, namespace, "vm")
        REPORT.append(f"cluster storage: Block-mode claim on {device} attached as the device, pattern on it")
    finally:
        core.delete_persistent_volume(pv)
        subprocess.run(["losetup", "-d", device], check=False)
