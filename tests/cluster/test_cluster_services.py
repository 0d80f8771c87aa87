"""A Kubernetes Service in front of a VM on a real node: kube-proxy sends a pod's connection to the guest
through the EndpointSlice kubenova's controller keeps, and a NodePort reaches it from the node's address.

The guest (the test guest: busybox httpd on port 80 naming its MAC) is on the node's default network; the
pod (the test ground's busybox image) is on the CNI bridge. Stopping the guest marks its endpoint not ready,
and kube-proxy refuses the connection; starting it serves again.
"""

from __future__ import annotations

import subprocess
import urllib.request
from typing import Any

import kubernetes
import pytest

from kubenova.handlers.shared import EXPOSE_LABEL, GROUP, LEASE_NAMESPACE, VERSION, VIRTUALINSTANCES
from testground import cluster, guest, kube, procs
from testground import ground as testground
from tests.cluster.test_cluster_mode import ready_pod
from tests.helpers import eventually
from tests.integration.test_agent import delete_and_wait, patch_spec, wait_ready
from tests.integration.test_node_network import wait_leased
from tests.integration.test_virtualinstance import make

pytestmark = pytest.mark.cluster


def endpoint(discovery: kubernetes.client.DiscoveryV1Api, namespace: str, service: str) -> Any:
    """The one endpoint of our slice for the Service, once there is one."""
    slices = discovery.list_namespaced_endpoint_slice(
        namespace,
        label_selector=f"kubernetes.io/service-name={service},endpointslice.kubernetes.io/managed-by=kubenova.io",
    ).items
    found = [e for s in slices for e in s.endpoints or []]
    return found[0] if len(found) == 1 else None


def fetch_in_pod(ground: testground.Ground, namespace: str, pod: str, url: str) -> tuple[bool, str]:
    """busybox wget in the pod, under timeout (its -T crashes in Debian's static busybox 1.35): (it answered,
    its output or error)."""
    proc = subprocess.run(
        [ground.kubectl, "exec", "-n", namespace, pod, "--", "timeout", "3", "wget", "-q", "-O", "-", url],
        capture_output=True,
        text=True,
        env=ground.env(),
        timeout=30,
    )
    return proc.returncode == 0, (proc.stdout or proc.stderr).strip()


def test_a_pod_reaches_a_vm_through_a_service_and_a_nodeport_and_stopping_the_vm_refuses(
    ground: testground.Ground,
    core: kubernetes.client.CoreV1Api,
    custom: kubernetes.client.CustomObjectsApi,
    api_client: kubernetes.client.ApiClient,
    namespace: str,
) -> None:
    helm = kube.build_helm()
    cluster.helm_install(ground.layout, helm, ground.env(), ground.node, ground.image_store)
    ready_pod(core, "agent")
    ready_pod(core, "controller")
    discovery = kubernetes.client.DiscoveryV1Api(api_client)

    body = make("web")
    body["metadata"]["labels"] = {"app": "web"}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)
    wait_ready(custom, namespace, "web", timeout=180)
    address = wait_leased(custom, namespace, "web")
    mac = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, "web")["status"][
        "interfaces"
    ][0]["macAddress"]
    service = core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "web", "labels": {EXPOSE_LABEL: "true"}},
            "spec": {
                "type": "NodePort",
                "selector": {"app": "web"},
                "ports": [{"port": 80, "targetPort": 80}],
            },
        },
    )
    cluster_ip, node_port = service.spec.cluster_ip, service.spec.ports[0].node_port
    found = eventually(lambda: endpoint(discovery, namespace, "web"), 60, 0.5, "the VM's endpoint")
    assert found.addresses == [address] and found.conditions.ready and found.node_name == ground.node
    assert found.target_ref.kind == "VirtualInstance" and found.target_ref.name == "web"

    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "client"},
            "spec": {
                "containers": [
                    {
                        "name": "c",
                        "image": cluster.BUSYBOX_IMAGE,
                        "command": ["sleep", "3600"],
                        "imagePullPolicy": "Never",
                    }
                ],
                "terminationGracePeriodSeconds": 0,
            },
        },
    )
    eventually(
        lambda: core.read_namespaced_pod("client", namespace).status.phase == "Running",
        120,
        1,
        "the client pod",
    )
    served = f"{guest.HTTP} {mac}"
    answered = eventually(
        lambda: (r := fetch_in_pod(ground, namespace, "client", f"http://{cluster_ip}/"))[0] and r[1],
        60,
        1,
        "the VM's answer through the ClusterIP",
    )
    assert answered == served
    with urllib.request.urlopen(f"http://{cluster.NODE_IP}:{node_port}/", timeout=5) as reply:
        assert reply.read().decode().strip() == served, "the NodePort on the node's address"

    patch_spec(custom, namespace, "web", {"powerState": "Stopped"})
    eventually(lambda: not endpoint(discovery, namespace, "web").conditions.ready, 60, 0.5, "not ready")
    refused = eventually(
        lambda: not (r := fetch_in_pod(ground, namespace, "client", f"http://{cluster_ip}/"))[0] and r[1],
        60,
        1,
        "the connection refused",
    )
    assert "refused" in refused.lower(), refused

    patch_spec(custom, namespace, "web", {"powerState": "Running"})
    eventually(lambda: endpoint(discovery, namespace, "web").conditions.ready, 120, 0.5, "ready again")
    again = eventually(
        lambda: (r := fetch_in_pod(ground, namespace, "client", f"http://{cluster_ip}/"))[0] and r[1],
        60,
        1,
        "served again",
    )
    assert again == served

    core.delete_namespaced_pod("client", namespace, grace_period_seconds=0)
    core.delete_namespaced_service("web", namespace)
    delete_and_wait(custom, namespace, "web")
    procs.run(
        [str(helm), "uninstall", cluster.RELEASE, "--namespace", LEASE_NAMESPACE, "--wait"],
        "helm uninstall",
        "",
        env=ground.env(),
    )
