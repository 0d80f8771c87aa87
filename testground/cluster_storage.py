"""Cluster mode's storage: a real provisioner, and the kubelet's mounts where the node's libvirtd sees them.

Rancher's local-path-provisioner (built from its Go module by hack/build-tools.sh storage) runs as a
process of the node, like kube-scheduler, with the admin's kubeconfig. It serves the StorageClass
``local-path`` (the cluster's default): each claim gets a folder under ``<state>/cluster/local-path``,
made by a helper pod (the test ground's busybox image, which has the shell its scripts need), and a
``local`` PersistentVolume pinned to node-0, so the kubelet bind-mounts the folder into each pod that
uses the claim, as a CSI driver mounts a volume. Claims bind when their first pod is scheduled
(WaitForFirstConsumer), on the node the scheduler picked.
"""

from __future__ import annotations

import json
import pathlib
import subprocess

import yaml

from kubenova.handlers.agent.claims import mount_points
from testground import kube, procs
from testground.cluster import BUSYBOX_IMAGE, cluster_dir, kubelet_dir
from testground.procs import Layout

STORAGE_CLASS = "local-path"
NAMESPACE = "local-path-storage"
PROVISIONER = "rancher.io/local-path"
CONFIG_MAP = "local-path-config"
SERVICE_ACCOUNT = "local-path-provisioner"


def volumes_dir(layout: Layout) -> pathlib.Path:
    """Where the provisioner makes each claim's folder."""
    return cluster_dir(layout) / "local-path"


def share_kubelet_dir(layout: Layout) -> pathlib.Path:
    """The kubelet's folder as a shared mount, made before node-0's libvirtd starts in its own mount
    namespace (as a slave of this one): the kubelet's later mounts (claims for holder pods) then show
    there too, as they do for a node's libvirtd, which runs in the host's mount namespace."""
    folder = kubelet_dir(layout)
    folder.mkdir(parents=True, exist_ok=True)
    what = "sharing the kubelet's folder"
    if str(folder) not in mount_points():
        procs.run(["mount", "--bind", str(folder), str(folder)], what, "run as root")
    procs.run(["mount", "--make-rshared", str(folder)], what, "run as root")
    return folder


def _manifests(layout: Layout) -> list[dict[str, object]]:
    setup = 'set -eu\nmkdir -m 0777 -p "$VOL_DIR"\n'
    teardown = 'set -eu\nrm -rf "$VOL_DIR"\n'
    helper = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "helper-pod"},
        "spec": {"containers": [{"name": "helper-pod", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never"}]},
    }
    paths = [str(volumes_dir(layout))]
    config = {"nodePathMap": [{"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": paths}]}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": CONFIG_MAP, "namespace": NAMESPACE},
            "data": {
                "config.json": json.dumps(config),
                "setup": setup,
                "teardown": teardown,
                "helperPod.yaml": yaml.safe_dump(helper),
            },
        },
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                # local PersistentVolumes (not hostPath ones): the kubelet mounts them into each pod's folder.
                "annotations": {
                    "defaultVolumeType": "local",
                    "storageclass.kubernetes.io/is-default-class": "true",
                },
            },
            "provisioner": PROVISIONER,
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete",
        },
    ]


def start_provisioner(layout: Layout, kubectl: pathlib.Path, env: dict[str, str]) -> None:
    """The StorageClass and the provisioner's namespace, then the provisioner (once)."""
    volumes_dir(layout).mkdir(parents=True, exist_ok=True)
    manifests = _manifests(layout)
    procs.run(
        [str(kubectl), "apply", "-f", "-"],
        "storing the local-path provisioner's StorageClass",
        "check the test ground's apiserver",
        env=env,
        input=yaml.safe_dump_all(manifests),
    )
    config = cluster_dir(layout) / "local-path.json"
    config.write_text(str(manifests[2]["data"]["config.json"]))  # type: ignore[index]
    binary = kube.build_storage_tools() / "local-path-provisioner"
    argv = [
        str(binary),
        "start",
        f"--config={config}",
        f"--kubeconfig={layout.kubeconfig}",
        f"--namespace={NAMESPACE}",
        f"--provisioner-name={PROVISIONER}",
        f"--helper-image={BUSYBOX_IMAGE}",
        f"--configmap-name={CONFIG_MAP}",
        f"--service-account-name={SERVICE_ACCOUNT}",
    ]
    if not procs.running_pid(layout, "local-path-provisioner"):
        procs.start(layout, "local-path-provisioner", argv, marker=f"--config={config}")


def claim_folder(kubectl: pathlib.Path, env: dict[str, str], namespace: str, claim: str) -> pathlib.Path:
    """The node folder of a bound claim's local PersistentVolume."""
    volume = subprocess.run(
        [str(kubectl), "get", "pvc", "-n", namespace, claim, "-o", "jsonpath={.spec.volumeName}"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    path = subprocess.run(
        [str(kubectl), "get", "pv", volume, "-o", "jsonpath={.spec.local.path}"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    return pathlib.Path(path)
