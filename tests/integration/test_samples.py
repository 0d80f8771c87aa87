"""The samples of deploy/samples/ that run on a single test-ground node, applied as a user would, reach the
phase their comments promise. The others say in their first lines what they need (another node, an image
the store does not have); every sample passes a server-side dry run (test_api_validation.py)."""

from __future__ import annotations

import pathlib
from typing import Any

import kubernetes
import yaml

from kubenova.handlers.shared import GROUP, VERSION, VIRTUALINSTANCES, VOLUMEATTACHMENTS
from testground import ground as testground
from testground.served import Served
from tests.helpers import eventually
from tests.integration.test_agent import console_text, wait_ready
from tests.integration.test_image_imports import sha256
from tests.integration.test_node_network import wait_leased

SAMPLES = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "samples"
#: Samples that need more than one node or an image the test ground's store lacks: said in their comments.
NEEDS_MORE = {
    "computenode-maintenance.yaml": "node-1",
    "migration-cold-resize.yaml": "another node",
    "migration-live.yaml": "node-1",
    "virtualinstance-actions.yaml": "debian-12-genericcloud-amd64.qcow2",
    "virtualinstance-rescue.yaml": "debian-12-genericcloud-amd64.qcow2",
    "volumeattachment-image.yaml": "tools.iso",
}


def sample(name: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((SAMPLES / name).read_text())
    body["metadata"].pop("namespace", None)
    return body


def apply(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, plural: str, body: dict[str, Any]
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body, field_validation="Strict")


def test_every_sample_either_runs_here_or_says_what_it_needs() -> None:
    for path in sorted(SAMPLES.glob("*.yaml")):
        header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
        if path.name in NEEDS_MORE:
            assert NEEDS_MORE[path.name] in header and "Needs" in header, (path.name, header)


def test_the_single_node_samples_reach_their_phase(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, core: kubernetes.client.CoreV1Api,
    served: Served, namespace: str,
) -> None:  # fmt: skip
    apply(custom, namespace, VIRTUALINSTANCES, sample("virtualinstance.yaml"))
    apply(custom, namespace, VIRTUALINSTANCES, sample("virtualinstance-power.yaml"))
    wait_ready(custom, namespace, "demo")
    apply(custom, namespace, VOLUMEATTACHMENTS, sample("volumeattachment.yaml"))
    wait_ready(custom, namespace, "paused-demo", "Paused")
    eventually(
        lambda: (
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, VOLUMEATTACHMENTS, "demo-data")
            .get("status", {})
            .get("phase")
            == "Attached"
        ),
        timeout=120,
        what="demo-data Attached",
    )

    # The Service sample: the VM's leased address in the EndpointSlice kubenova's controller keeps.
    vm, service = yaml.safe_load_all((SAMPLES / "virtualinstance-service.yaml").read_text())
    for body in (vm, service):
        body["metadata"].pop("namespace")
    apply(custom, namespace, VIRTUALINSTANCES, vm)
    core.create_namespaced_service(namespace, service)
    address = wait_leased(custom, namespace, "hello")
    discovery = kubernetes.client.DiscoveryV1Api(core.api_client)
    eventually(
        lambda: (
            [
                e.addresses
                for s in discovery.list_namespaced_endpoint_slice(
                    namespace, label_selector="kubernetes.io/service-name=hello"
                ).items
                for e in s.endpoints or []
                if e.conditions.ready
            ]
            == [[address]]
        ),
        timeout=60,
        what="the VM's address ready in the Service's EndpointSlice",
    )

    # The image sample, with the checksum the test ground's image has today (its comment says so).
    web = sample("virtualinstance-image.yaml")
    assert web["spec"]["boot"]["image"]["url"] == served.url(served.cloud_image)
    web["spec"]["boot"]["image"]["checksum"] = f"sha256:{sha256(served.root / served.cloud_image)}"
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "web-admin"}, "stringData": {"password": "pw"}}
    )
    apply(custom, namespace, VIRTUALINSTANCES, web)
    uid = wait_ready(custom, namespace, "web", timeout=300)["metadata"]["uid"]
    eventually(
        lambda: "web booted on web" in console_text(ground, uid),
        timeout=420,
        interval=2,
        what="the sample's userData on the console",
    )
