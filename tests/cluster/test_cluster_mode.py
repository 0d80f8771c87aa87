"""kubenova's own image on a real node: the chart's DaemonSet and Deployment run by kubelet and containerd.

The life of an install, end to end: helm install, a guest boots, the agent's pod is deleted and its
replacement adopts the running guest, a helm upgrade rolls the pods under the running guest, the
guest is deleted, helm uninstall leaves no pods.
"""

from __future__ import annotations

import datetime
import subprocess
import time
from typing import Any

import kubernetes
import libvirt
import pytest

from kubenova.handlers.shared import GROUP, LEASE_NAMESPACE, VERSION, VIRTUALINSTANCES
from testground import cluster, kube, procs
from testground import ground as testground
from tests.helpers import REPORT, eventually, listeners, on_every_interface
from tests.integration import service_accounts
from tests.integration.test_agent import boots, delete_and_wait, ticks, wait_ready
from tests.integration.test_install import expected_rows, kubenova_rows
from tests.integration.test_virtualinstance import domain, make

pytestmark = pytest.mark.cluster


def pods(core: kubernetes.client.CoreV1Api, component: str) -> list[Any]:
    return [
        p
        for p in core.list_namespaced_pod(
            LEASE_NAMESPACE,
            label_selector=(f"app.kubernetes.io/name=kubenova,app.kubernetes.io/component={component}"),
        ).items
        if not p.metadata.deletion_timestamp
    ]


def ready_pod(core: kubernetes.client.CoreV1Api, component: str, other_than: str = "") -> Any:
    """The one Ready pod of a component, once it is not ``other_than`` (a pod that was replaced)."""

    def probe() -> Any:
        found = pods(core, component)
        ready = [
            p
            for p in found
            if p.metadata.uid != other_than
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]
        return ready[0] if len(found) == 1 and ready else None

    return eventually(probe, timeout=240, interval=1, what=f"one Ready {component} pod")


def test_the_chart_runs_kubenova_on_a_real_node_and_guests_outlive_its_pods(
    ground: testground.Ground,
    core: kubernetes.client.CoreV1Api,
    custom: kubernetes.client.CustomObjectsApi,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    helm = kube.build_helm()
    started = time.monotonic()
    cluster.helm_install(ground.layout, helm, ground.env(), ground.node, ground.image_store)
    agent, controller = ready_pod(core, "agent"), ready_pod(core, "controller")
    REPORT.append(f"cluster mode: helm install -> pods Ready in {time.monotonic() - started:.1f}s")
    image = testground.image_ref()
    assert agent.spec.containers[0].image == image and controller.spec.containers[0].image == image
    assert agent.spec.node_name == ground.node and agent.metadata.owner_references[0].kind == "DaemonSet"
    assert controller.spec.service_account_name == "kubenova-controller", "its own ServiceAccount token"
    # Ready, so the kubelet mounted the node's migration certificate: the agent's libvirt client folder.
    pki = next(v for v in agent.spec.volumes if v.name == "migration-pki")
    assert pki.secret.secret_name == cluster.MIGRATION_SECRET
    assert "--migration-pki-dir=/etc/kubenova/migration-pki" in agent.spec.containers[0].args

    def registered() -> Any:
        found = custom.list_cluster_custom_object(
            GROUP, VERSION, "computenodes", field_selector=f"metadata.name={ground.node}"
        )["items"]
        return found and found[0].get("status", {}).get("capacity")

    eventually(registered, timeout=120, what="the pod's agent to register node-0")
    # The agent names the Kubernetes Node it runs on: deleting that Node, or tainting it out-of-service,
    # is a fencing signal the controller (which watches Nodes in cluster mode) acts on.
    node_status = custom.get_cluster_custom_object(GROUP, VERSION, "computenodes", ground.node)["status"]
    assert node_status["kubernetesNode"] == agent.spec.node_name
    the_pods_token_names_its_node_and_admission_keeps_it_there(ground, custom, agent.metadata.name)
    the_built_in_roles_carry_kubenovas_by_aggregation(ground, core, namespace)

    started = time.monotonic()
    uid = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, make("vm"))[
        "metadata"
    ]["uid"]
    wait_ready(custom, namespace, "vm")
    eventually(lambda: boots(ground, uid) == 1, timeout=180, interval=0.5, what="the guest's boot marker")
    REPORT.append(f"cluster mode: apply -> boot marker in {time.monotonic() - started:.2f}s")
    dom = domain(hypervisor, uid)
    assert dom is not None and dom.isActive()
    qemu = dom.ID()

    def keeps_running(after: str) -> None:
        before = ticks(ground, uid)
        eventually(lambda: ticks(ground, uid) > before, timeout=60, what=f"the guest to keep ticking {after}")
        now = domain(hypervisor, uid)
        assert now is not None and now.ID() == qemu, f"the same QEMU process {after}"
        assert boots(ground, uid) == 1, f"no second boot {after}"

    core.delete_namespaced_pod(agent.metadata.name, LEASE_NAMESPACE)
    replacement = ready_pod(core, "agent", other_than=agent.metadata.uid)
    assert replacement.metadata.name != agent.metadata.name

    # The new agent took the running guest over: its own diagnostics (every 60 s by the chart's
    # default) reach the status, and the guest never stopped.
    def reported_since(pod: Any) -> bool:
        status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, "vm")[
            "status"
        ]
        written = datetime.datetime.strptime(
            status.get("diagnostics", {}).get("updateTime", "1970-01-01T00:00:00Z"), "%Y-%m-%dT%H:%M:%SZ"
        ).replace(tzinfo=datetime.UTC)
        return status.get("powerState") == "Running" and written > pod.metadata.creation_timestamp

    eventually(
        lambda: reported_since(replacement),
        timeout=150,
        interval=2,
        what="the new agent's diagnostics of the adopted guest",
    )
    keeps_running("after the agent's pod was deleted")

    # Every component on this node, and the agent in the host's network: none listens on every interface.
    ours = {procs.running_pid(ground.layout, name) or 0 for name in (*cluster.COMPONENTS, "kube-apiserver")}
    ours |= {
        int(p)
        for p in subprocess.run(
            ["pgrep", "-f", "kubenova agent|libvirtd|qemu-system"], capture_output=True, text=True
        ).stdout.split()
    }
    found = listeners(ours)
    assert not [line for line in found if on_every_interface(line)], f"listens on every interface: {found}"
    assert len(found) >= 6, (
        f"expected the kubelet, the apiserver, the agent's metrics, libvirtd... among {found}"
    )

    cluster.helm_install(
        ground.layout, helm, ground.env(), ground.node, ground.image_store, "--set", "agent.resyncSeconds=20"
    )
    rolled = ready_pod(core, "agent", other_than=replacement.metadata.uid)
    assert "--resync-interval=20" in rolled.spec.containers[0].args, "the upgrade rolled the DaemonSet"
    keeps_running("after helm upgrade")

    delete_and_wait(custom, namespace, "vm")
    eventually(lambda: domain(hypervisor, uid) is None, timeout=60, what="the domain to be gone")

    procs.run(
        [str(helm), "uninstall", cluster.RELEASE, "--namespace", LEASE_NAMESPACE, "--wait"],
        "helm uninstall",
        "",
        env=ground.env(),
    )
    eventually(
        lambda: not core.list_namespaced_pod(LEASE_NAMESPACE).items,
        timeout=120,
        what="no kubenova pods after helm uninstall",
    )


def the_pods_token_names_its_node_and_admission_keeps_it_there(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, pod: str
) -> None:
    """The kubelet binds the agent's projected token to its pod, so the apiserver knows the node that
    speaks: kubenova-agent-scope lets it write its own ComputeNode and refuses it another's."""
    read = "print(open('/var/run/secrets/kubernetes.io/serviceaccount/token').read())"
    token = subprocess.run(
        [ground.kubectl, "exec", "-n", LEASE_NAMESPACE, pod, "-c", "agent", "--", "python3", "-c", read],
        capture_output=True,
        text=True,
        env=ground.env(),
        check=True,
    ).stdout.strip()
    config = kubernetes.client.Configuration()
    config.host = custom.api_client.configuration.host
    config.ssl_ca_cert = custom.api_client.configuration.ssl_ca_cert
    config.api_key = {"authorization": f"Bearer {token}"}
    client = kubernetes.client.ApiClient(config)
    review = kubernetes.client.AuthenticationV1Api(client).create_self_subject_review({})
    assert review.status.user_info.extra["authentication.kubernetes.io/node-name"] == [ground.node]
    as_agent = kubernetes.client.CustomObjectsApi(client)
    current = custom.get_cluster_custom_object(GROUP, VERSION, "computenodes", ground.node)
    own = {"status": {"hostname": current["status"]["hostname"]}}  # allowed, and changes nothing
    as_agent.patch_cluster_custom_object_status(GROUP, VERSION, "computenodes", ground.node, own)
    ghost = "ghost-node"
    custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "computenodes",
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ComputeNode", "metadata": {"name": ghost}},
    )
    try:
        with pytest.raises(kubernetes.client.ApiException) as denied:
            as_agent.patch_cluster_custom_object_status(GROUP, VERSION, "computenodes", ghost, own)
        assert denied.value.status == 403 and "may write only its own ComputeNode" in denied.value.body
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, "computenodes", ghost)


def the_built_in_roles_carry_kubenovas_by_aggregation(
    ground: testground.Ground, core: kubernetes.client.CoreV1Api, namespace: str
) -> None:
    """kube-controller-manager aggregates kubenova-view/-edit/-admin into view, edit and admin: a user
    holding only a built-in role gets exactly the rows of deploy/rbac/user-<role>.txt (the default test
    ground, without kube-controller-manager, binds them by hand)."""
    for role in ("view", "edit", "admin"):
        user = f"{role}-user"
        service_accounts.bind_user(core.api_client, namespace, user, role)  # the built-in role alone

        def listed(user: str = user) -> str:
            return subprocess.run(
                [ground.kubectl, "auth", "can-i", "--list", "-n", namespace, "--as", user],
                capture_output=True,
                text=True,
                env=ground.env(),
                check=True,
            ).stdout

        eventually(
            lambda r=role, listed=listed: kubenova_rows(listed()) == expected_rows(r),
            timeout=60,
            what=f"kubenova's rows in the built-in {role} role (aggregation)",
        )
