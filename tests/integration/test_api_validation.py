"""The API rejects bad YAML at apply time, on the real kube-apiserver, naming the field.

Every manifest below is invalid in exactly one way; the apiserver must refuse it with
HTTP 422 (or 400 for an unknown field under strict field validation, as kubectl sends it)
and a message that names the offending field.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Callable
from typing import Any

import kubernetes
import pytest
import yaml

from kubenova.handlers.shared import GROUP, VERSION

REPO = pathlib.Path(__file__).resolve().parents[2]
SHA = "sha256:" + "a" * 64

VI: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "VirtualInstance",
    "metadata": {"name": "x"},
    "spec": {
        "flavor": {"vcpus": 1, "memoryMiB": 128},
        "boot": {"kernel": {"image": "vmlinuz", "initrd": "initrd.img"}},
    },
}
VA: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "VolumeAttachment",
    "metadata": {"name": "x"},
    "spec": {"instanceRef": {"name": "vm"}, "volume": {"name": "data", "sizeGiB": 1}},
}
MIG: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "Migration",
    "metadata": {"name": "x"},
    "spec": {"instanceRef": {"name": "vm"}, "type": "Cold"},
}
CN: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "ComputeNode",
    "metadata": {"name": "x"},
    "spec": {},
}
PLURAL = {
    "VirtualInstance": "virtualinstances",
    "VolumeAttachment": "volumeattachments",
    "Migration": "migrations",
    "ComputeNode": "computenodes",
}


def with_(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of base with the dotted spec path set (None deletes it)."""
    body = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = body
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return body


def nic(name: str, mac: str | None = None) -> dict[str, Any]:
    return {"name": name, "network": "default", **({"macAddress": mac} if mac else {})}


# (id, manifest, text the rejection must contain)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    # VirtualInstance: types and ranges
    ("vcpus-zero", with_(VI, "spec.flavor.vcpus", 0), "spec.flavor.vcpus"),
    ("vcpus-too-many", with_(VI, "spec.flavor.vcpus", 257), "spec.flavor.vcpus"),
    ("vcpus-string", with_(VI, "spec.flavor.vcpus", "two"), "spec.flavor.vcpus"),
    ("memory-too-small", with_(VI, "spec.flavor.memoryMiB", 63), "spec.flavor.memoryMiB"),
    ("memory-huge", with_(VI, "spec.flavor.memoryMiB", 10**12), "spec.flavor.memoryMiB"),
    ("memory-float", with_(VI, "spec.flavor.memoryMiB", 128.5), "spec.flavor.memoryMiB"),
    ("flavor-missing", with_(VI, "spec.flavor", None), "spec.flavor"),
    ("boot-missing", with_(VI, "spec.boot", None), "spec.boot"),
    ("two-boot-sources", with_(VI, "spec.boot.image", {"name": "disk.qcow2"}), "exactly one boot source"),
    ("no-boot-source", with_(VI, "spec.boot", {}), "exactly one boot source"),
    ("kernel-host-path", with_(VI, "spec.boot.kernel.image", "/boot/vmlinuz"), "spec.boot.kernel.image"),
    ("kernel-traversal", with_(VI, "spec.boot.kernel.image", "../../etc/shadow"), "spec.boot.kernel.image"),
    ("initrd-host-path", with_(VI, "spec.boot.kernel.initrd", "/etc/passwd"), "spec.boot.kernel.initrd"),
    ("cmdline-huge", with_(VI, "spec.boot.kernel.cmdline", "x" * 5000), "spec.boot.kernel.cmdline"),
    (
        "image-url-without-checksum",
        with_(
            with_(VI, "spec.boot", {"image": {"name": "d.qcow2", "url": "https://example.invalid/d"}}),
            "spec.boot.kernel",
            None,
        ),
        "checksum is required",
    ),
    (
        "image-bad-checksum",
        with_(VI, "spec.boot", {"image": {"name": "d.qcow2", "checksum": "md5:abc"}}),
        "spec.boot.image.checksum",
    ),
    (
        "image-url-file-scheme",
        with_(VI, "spec.boot", {"image": {"name": "d", "url": "file:///etc/passwd", "checksum": SHA}}),
        "spec.boot.image.url",
    ),
    ("power-state-unknown", with_(VI, "spec.powerState", "Exploded"), "spec.powerState"),
    ("root-disk-zero", with_(VI, "spec.rootDisk", {"sizeGiB": 0}), "spec.rootDisk.sizeGiB"),
    (
        "ephemeral-duplicate",
        with_(VI, "spec.ephemeralDisks", [{"name": "a", "sizeGiB": 1}, {"name": "a", "sizeGiB": 2}]),
        "spec.ephemeralDisks",
    ),
    (
        "ephemeral-too-many",
        with_(VI, "spec.ephemeralDisks", [{"name": f"d{i}", "sizeGiB": 1} for i in range(9)]),
        "spec.ephemeralDisks",
    ),
    ("swap-negative", with_(VI, "spec.swap", {"sizeMiB": -1}), "spec.swap.sizeMiB"),
    (
        "duplicate-macs",
        with_(VI, "spec.interfaces", [nic("a", "52:54:00:00:00:01"), nic("b", "52:54:00:00:00:01")]),
        "macAddress",
    ),
    ("duplicate-nic-names", with_(VI, "spec.interfaces", [nic("a"), nic("a")]), "spec.interfaces"),
    (
        "mac-malformed",
        with_(VI, "spec.interfaces", [nic("a", "52:54:00:00:00")]),
        "spec.interfaces[0].macAddress",
    ),
    (
        "mac-multicast",
        with_(VI, "spec.interfaces", [nic("a", "01:00:5e:00:00:01")]),
        "spec.interfaces[0].macAddress",
    ),
    (
        "mac-upper-case",
        with_(VI, "spec.interfaces", [nic("a", "52:54:00:AB:CD:EF")]),
        "spec.interfaces[0].macAddress",
    ),
    (
        "nic-model-unknown",
        with_(VI, "spec.interfaces", [{**nic("a"), "model": "ne2k"}]),
        "spec.interfaces[0].model",
    ),
    (
        "nic-network-shell",
        with_(VI, "spec.interfaces", [nic("a") | {"network": "br0; rm -rf /"}]),
        "spec.interfaces[0].network",
    ),
    ("rescue-without-image", with_(VI, "spec.rescue", {"enabled": True}), "spec.rescue.image is required"),
    ("user-data-oversized", with_(VI, "spec.userData", "x" * 65537), "spec.userData"),
    (
        "injected-files-too-many",
        with_(VI, "spec.injectedFiles", [{"path": f"/f{i}", "content": "eA=="} for i in range(6)]),
        "spec.injectedFiles",
    ),
    (
        "injected-file-relative",
        with_(VI, "spec.injectedFiles", [{"path": "etc/x", "content": "eA=="}]),
        "spec.injectedFiles[0].path",
    ),
    (
        "injected-file-traversal",
        with_(VI, "spec.injectedFiles", [{"path": "/etc/../../x", "content": "eA=="}]),
        "'..' segments",
    ),
    (
        "injected-file-not-base64",
        with_(VI, "spec.injectedFiles", [{"path": "/etc/x", "content": "%%%"}]),
        "spec.injectedFiles[0].content",
    ),
    (
        "injected-file-oversized",
        with_(VI, "spec.injectedFiles", [{"path": "/etc/x", "content": "A" * 14000}]),
        "spec.injectedFiles[0].content",
    ),
    ("inline-admin-password", with_(VI, "spec.adminPassword", "hunter2"), "adminPassword"),
    (
        "password-reset-without-secret",
        with_(VI, "spec.actions", {"passwordReset": {"id": "1"}}),
        "needs spec.adminPasswordSecretRef",
    ),
    (
        "reboot-type-unknown",
        with_(VI, "spec.actions", {"reboot": {"id": "1", "type": "Gentle"}}),
        "spec.actions.reboot.type",
    ),
    ("reboot-without-id", with_(VI, "spec.actions", {"reboot": {"type": "Soft"}}), "spec.actions.reboot.id"),
    (
        "snapshot-host-path",
        with_(VI, "spec.actions", {"snapshot": {"id": "1", "imageName": "/tmp/x"}}),
        "spec.actions.snapshot.imageName",
    ),
    ("node-name-invalid", with_(VI, "spec.nodeName", "Not_A_Node"), "spec.nodeName"),
    (
        "node-selector-too-big",
        with_(VI, "spec.nodeSelector", {f"k{i}": "v" for i in range(17)}),
        "spec.nodeSelector",
    ),
    (
        "secret-ref-bad-name",
        with_(VI, "spec.adminPasswordSecretRef", {"name": "../x"}),
        "spec.adminPasswordSecretRef.name",
    ),
    # VolumeAttachment
    ("va-no-instance", with_(VA, "spec.instanceRef", None), "spec.instanceRef"),
    (
        "va-instance-in-other-namespace",
        with_(VA, "spec.instanceRef", {"name": "vm", "namespace": "kube-system"}),
        "namespace",
    ),
    ("va-two-sources", with_(VA, "spec.image", {"name": "base.qcow2"}), "exactly one volume source"),
    ("va-no-source", with_(VA, "spec.volume", None), "exactly one volume source"),
    ("va-volume-host-path", with_(VA, "spec.volume.name", "/dev/sda"), "spec.volume.name"),
    ("va-size-zero", with_(VA, "spec.volume.sizeGiB", 0), "spec.volume.sizeGiB"),
    (
        "va-claim-and-name",
        with_(VA, "spec.volume.persistentVolumeClaim", {"claimName": "data"}),
        "set exactly one of spec.volume.name",
    ),
    (
        "va-claim-with-size",
        with_(VA, "spec.volume", {"persistentVolumeClaim": {"claimName": "data"}, "sizeGiB": 1}),
        "a claim has its own size",
    ),
    # Another namespace's claim cannot be named: a claim name is one DNS name, no namespace, no path.
    (
        "va-claim-other-namespace",
        with_(VA, "spec.volume", {"persistentVolumeClaim": {"claimName": "kube-system/data"}}),
        "spec.volume.persistentVolumeClaim.claimName",
    ),
    (
        "va-claim-namespace-field",
        with_(
            VA, "spec.volume", {"persistentVolumeClaim": {"claimName": "data", "namespace": "kube-system"}}
        ),
        "namespace",
    ),
    (
        "vi-root-claim-with-size",
        with_(VI, "spec.rootDisk", {"persistentVolumeClaim": {"claimName": "data"}, "sizeGiB": 1}),
        "drop spec.rootDisk.sizeGiB",
    ),
    (
        "vi-root-claim-other-namespace",
        with_(VI, "spec.rootDisk", {"persistentVolumeClaim": {"claimName": "kube-system/data"}}),
        "spec.rootDisk.persistentVolumeClaim.claimName",
    ),
    ("va-device-name", with_(VA, "spec.device", {"name": "hda"}), "spec.device.name"),
    ("va-device-bus-mismatch", with_(VA, "spec.device", {"name": "sdb", "bus": "virtio"}), "start with vd"),
    ("va-bus-unknown", with_(VA, "spec.device", {"bus": "ide"}), "spec.device.bus"),
    # Migration
    ("mig-type-unknown", with_(MIG, "spec.type", "Teleport"), "spec.type"),
    ("mig-no-instance", with_(MIG, "spec.instanceRef", None), "spec.instanceRef"),
    (
        "mig-live-resize",
        with_(with_(MIG, "spec.type", "Live"), "spec.flavor", {"vcpus": 2, "memoryMiB": 256}),
        "needs spec.type Cold",
    ),
    (
        "mig-live-decision",
        with_(with_(MIG, "spec.type", "Live"), "spec.decision", "Confirm"),
        "Cold migrations only",
    ),
    ("mig-decision-unknown", with_(MIG, "spec.decision", "Maybe"), "spec.decision"),
    (
        "mig-cold-convergence",
        with_(MIG, "spec.convergence", {"postCopy": True}),
        "spec.convergence applies to Live migrations only",
    ),
    (
        "mig-post-copy-string",
        with_(MIG, "spec.convergence", {"postCopy": "yes"}),
        "spec.convergence.postCopy",
    ),
    (
        "mig-auto-confirm-negative",
        with_(MIG, "spec.confirmation", {"autoConfirmSeconds": -5}),
        "spec.confirmation.autoConfirmSeconds",
    ),
    (
        "mig-resize-too-small",
        with_(MIG, "spec.flavor", {"vcpus": 1, "memoryMiB": 1}),
        "spec.flavor.memoryMiB",
    ),
    # ComputeNode
    (
        "cn-power-action-unknown",
        with_(CN, "spec.powerAction", {"id": "1", "action": "Explode"}),
        "spec.powerAction.action",
    ),
    ("cn-enabled-string", with_(CN, "spec.enabled", "yes"), "spec.enabled"),
    ("cn-subnet-not-cidr", with_(CN, "spec.network.subnet", "10.222.0.0"), "spec.network.subnet"),
    ("cn-subnet-too-big", with_(CN, "spec.network.subnet", "10.0.0.0/8"), "from /16 to /29"),
    ("cn-subnet-host-bits", with_(CN, "spec.network.subnet", "10.222.0.7/24"), "spec.network.subnet"),
    ("cn-provider-action", with_(CN, "spec.firewall", {"ingress": [{"action": "Maybe"}]}), "action"),
    # spec.firewall: ports and sources
    ("firewall-port-zero", with_(VI, "spec.firewall", {"ingress": [{"protocol": "TCP", "port": 0}]}), "port"),
    (
        "firewall-port-huge",
        with_(VI, "spec.firewall", {"ingress": [{"protocol": "TCP", "port": 70000}]}),
        "port",
    ),
    (
        "firewall-range-backwards",
        with_(VI, "spec.firewall", {"ingress": [{"protocol": "TCP", "port": 90, "endPort": 80}]}),
        "endPort needs port",
    ),
    (
        "firewall-icmp-port",
        with_(VI, "spec.firewall", {"ingress": [{"protocol": "ICMP", "port": 1}]}),
        "TCP and UDP",
    ),
    (
        "firewall-bad-cidr",
        with_(VI, "spec.firewall", {"ingress": [{"cidr": "10.0.0.300/8"}]}),
        "IPv4 network",
    ),
    ("firewall-protocol", with_(VI, "spec.firewall", {"ingress": [{"protocol": "SCTP"}]}), "protocol"),
]

# (id, valid manifest, change, text the rejection must contain): updates that must be refused.
IMMUTABLE: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    (
        "vi-node-name",
        with_(VI, "spec.nodeName", "node-a"),
        {"spec": {"nodeName": "node-b"}},
        "spec.nodeName is immutable",
    ),
    ("va-instance", VA, {"spec": {"instanceRef": {"name": "other"}}}, "spec.instanceRef is immutable"),
    ("va-volume", VA, {"spec": {"volume": {"name": "other"}}}, "spec.volume is immutable"),
    ("mig-instance", MIG, {"spec": {"instanceRef": {"name": "other"}}}, "spec.instanceRef is immutable"),
    ("mig-type", MIG, {"spec": {"type": "Live"}}, "spec.type is immutable"),
    (
        "mig-decision-changed",
        with_(MIG, "spec.decision", "Confirm"),
        {"spec": {"decision": "Revert"}},
        "cannot change once made",
    ),
    ("mig-uncancel", with_(MIG, "spec.cancel", True), {"spec": {"cancel": False}}, "cannot go back to false"),
    (
        "mig-convergence",
        with_(with_(MIG, "spec.type", "Live"), "spec.convergence", {"autoConverge": True}),
        {"spec": {"convergence": {"postCopy": True}}},
        "spec.convergence is immutable",
    ),
    (
        "vi-root-disk-shrinks",
        with_(VI, "spec.rootDisk", {"sizeGiB": 2}),
        {"spec": {"rootDisk": {"sizeGiB": 1}}},
        "spec.rootDisk.sizeGiB can only grow",
    ),
    (
        "vi-ephemeral-disk-shrinks",
        with_(VI, "spec.ephemeralDisks", [{"name": "e", "sizeGiB": 2}]),
        {"spec": {"ephemeralDisks": [{"name": "e", "sizeGiB": 1}]}},
        "sizeGiB can only grow",
    ),
    (
        "vi-swap-shrinks",
        with_(VI, "spec.swap", {"sizeMiB": 64}),
        {"spec": {"swap": {"sizeMiB": 32}}},
        "spec.swap.sizeMiB can only grow",
    ),
    (
        "vi-boot-image-changed",
        with_(VI, "spec.boot", {"image": {"name": "a.qcow2"}}),
        {"spec": {"boot": {"image": {"name": "b.qcow2"}}}},
        "spec.boot.image's name and kind of source are fixed",
    ),
    # A root disk's claim is the instance's disk: another claim, or none, would be another disk.
    (
        "vi-root-claim-changed",
        with_(VI, "spec.rootDisk", {"persistentVolumeClaim": {"claimName": "a"}}),
        {"spec": {"rootDisk": {"persistentVolumeClaim": {"claimName": "b"}}}},
        "spec.rootDisk.persistentVolumeClaim is fixed when the instance is created",
    ),
    (
        "vi-root-claim-added",
        VI,
        {"spec": {"rootDisk": {"persistentVolumeClaim": {"claimName": "b"}}}},
        "create a new instance to boot from another claim",
    ),
    (
        "vi-root-claim-removed",
        with_(VI, "spec.rootDisk", {"persistentVolumeClaim": {"claimName": "a"}}),
        {"spec": {"rootDisk": None}},
        "is fixed when the instance is created (its disk is the root disk)",
    ),
    (
        "vi-kernel-to-image",
        VI,
        {"spec": {"boot": {"kernel": None, "image": {"name": "b.qcow2"}}}},
        "spec.boot.image's name and kind of source are fixed",
    ),
]


def create(custom: kubernetes.client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> Any:
    plural = PLURAL[body["kind"]]
    if body["kind"] == "ComputeNode":
        return custom.create_cluster_custom_object(GROUP, VERSION, plural, body, field_validation="Strict")
    return custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, body, field_validation="Strict"
    )


def rejected(call: Callable[[], Any]) -> str:
    with pytest.raises(kubernetes.client.ApiException) as err:
        call()
    assert err.value.status in (400, 422), err.value.body
    return str(err.value.body)


def test_there_are_at_least_forty_invalid_manifests() -> None:
    assert len(INVALID) >= 40
    assert len({case[0] for case in INVALID}) == len(INVALID)


@pytest.mark.parametrize("body, expected", [pytest.param(b, e, id=i) for i, b, e in INVALID])
def test_invalid_manifest_is_rejected_naming_the_field(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, body: dict[str, Any], expected: str
) -> None:
    message = rejected(lambda: create(custom, namespace, body))
    assert expected in message, message


@pytest.mark.parametrize("body, change, expected", [pytest.param(b, c, e, id=i) for i, b, c, e in IMMUTABLE])
def test_illegal_change_is_rejected(
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    body: dict[str, Any],
    change: dict[str, Any],
    expected: str,
) -> None:
    body = with_(body, "metadata.name", f"imm-{abs(hash(expected)) % 10**6}")
    if body["kind"] == "VirtualInstance":
        body = with_(body, "spec.powerState", "Stopped")
    create(custom, namespace, body)
    plural = PLURAL[body["kind"]]
    message = rejected(
        lambda: custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, body["metadata"]["name"], change
        )
    )
    assert expected in message, message
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, body["metadata"]["name"])


def samples() -> list[pathlib.Path]:
    return sorted((REPO / "deploy" / "samples").glob("*.yaml"))


@pytest.mark.parametrize("path", samples(), ids=lambda p: p.name)
def test_every_sample_passes_a_server_side_dry_run(
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    namespace: str,
    path: pathlib.Path,
) -> None:
    for body in yaml.safe_load_all(path.read_text()):
        body["metadata"].pop("namespace", None)  # samples may name one; the test has its own
        if body["kind"] == "Service":  # a Service in front of a sample's VMs
            core.create_namespaced_service(namespace, body, dry_run="All", field_validation="Strict")
            continue
        plural = PLURAL[body["kind"]]
        if body["kind"] == "ComputeNode":
            custom.create_cluster_custom_object(
                GROUP, VERSION, plural, body, dry_run="All", field_validation="Strict"
            )
        else:
            custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, body, dry_run="All", field_validation="Strict"
            )
