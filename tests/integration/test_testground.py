"""The test ground itself: the real components are up, versioned and secured as promised."""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import time

import kubernetes
import libvirt
import pytest

from testground import ground as testground
from testground import kube, libvirt_host, procs
from testground.procs import Layout, TestGroundError


def kubectl(ground: testground.Ground, *args: str) -> str:
    return subprocess.run(
        [ground.kubectl, *args], env=ground.env(), capture_output=True, text=True, check=True
    ).stdout


def test_apiserver_and_kubectl_report_the_pinned_release(ground: testground.Ground) -> None:
    versions = json.loads(kubectl(ground, "version", "-o", "json"))
    pinned = next(
        line.split()[1]
        for line in (kube.REPO / "hack/tools/kube/go.mod").read_text().splitlines()
        if line.strip().startswith("k8s.io/kubernetes v")
    )
    assert versions["serverVersion"]["gitVersion"] == pinned
    assert versions["clientVersion"]["gitVersion"] == pinned


def test_rbac_is_enforced_and_tokenrequest_works(
    ground: testground.Ground, core: kubernetes.client.CoreV1Api, namespace: str
) -> None:
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}})
    token = core.create_namespaced_service_account_token(
        "nobody", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    config = kubernetes.client.Configuration()
    config.host = f"https://127.0.0.1:{kube.APISERVER_PORT}"
    config.ssl_ca_cert = str(ground.layout.state / "pki" / "ca.crt")
    config.api_key = {"authorization": f"Bearer {token}"}
    as_sa = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(config))
    with pytest.raises(kubernetes.client.ApiException) as denied:
        as_sa.list_namespaced_custom_object("compute.kubenova.io", "v1alpha1", namespace, "virtualinstances")
    assert denied.value.status == 403
    assert f"system:serviceaccount:{namespace}:nobody" in denied.value.body


def test_libvirtd_runs_tcg_guests(hypervisor: libvirt.virConnect) -> None:
    caps = hypervisor.getCapabilities()
    assert "<domain type='qemu'" in caps
    assert hypervisor.getType() == "QEMU"


def test_dev_up_twice_is_a_no_op(ground: testground.Ground) -> None:
    before = testground.status(ground.layout)
    started = time.monotonic()
    again = testground.up()
    assert again.libvirt_uri == ground.libvirt_uri
    assert testground.status(ground.layout) == before
    assert all(state.startswith("running") for state in before.values()), before
    assert time.monotonic() - started < 30


def test_a_port_in_use_is_named_with_its_fix() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TestGroundError, match=f"port 127.0.0.1:{port} for etcd is already in use.*ETCD"):
            procs.check_port_free(port, "etcd", "KUBENOVA_ETCD_PORT")


def test_down_after_a_crash_cleans_up_a_libvirt_host(tmp_path: pathlib.Path) -> None:
    """kill -9 the libvirtd of a host: `down` still finds virtlogd by its mount namespace."""
    layout = Layout(tmp_path / "state", tmp_path / "cache")
    libvirt_host.start(layout, "crashy")
    host = libvirt_host.host_dir(layout, "crashy")
    libvirtd = int((host / "libvirtd.pid").read_text())
    virtlogd = int((host / "virtlogd.pid").read_text())
    subprocess.run(["kill", "-9", str(libvirtd)], check=True)
    assert procs.pid_alive(virtlogd)
    assert "crashy" in " ".join(testground.down(layout))
    assert not procs.pid_alive(virtlogd) and not procs.pid_alive(libvirtd)
    assert not layout.state.exists()
