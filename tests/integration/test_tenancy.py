"""Tenants and nodes cannot touch what is not theirs (DESIGN.md's trust model).

Each attack is run as its attacker would run it: a namespace user holding only the built-in ``edit``
role, through kubectl; a node, with its agent's own token (bound to a pod on that node, as the kubelet
binds it). kubenova runs from its chart's RBAC and admission policies, its controller and two agents
holding only their ServiceAccounts' tokens. After each attack, every instance has exactly one domain.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
from collections.abc import Iterator
from typing import Any

import kubernetes
import libvirt
import pytest

from kubenova.handlers.shared import (
    COMPUTENODES,
    GROUP,
    LEASE_NAMESPACE,
    MIGRATION_TARGET_LABEL,
    MIGRATIONS,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    VOLUMEATTACHMENTS,
)
from testground import ground as testground
from testground import guest, libvirt_host
from tests.helpers import empty_namespace, eventually
from tests.integration import service_accounts
from tests.integration.test_agent import patch_spec, wait_action, wait_ready
from tests.integration.test_virtualinstance import cond, get, make

OTHER = testground.node_name(1)
USER = "alice"  # a namespace user: the built-in edit role in the test's namespace, nothing else


@pytest.fixture(scope="module")
def tenancy(
    ground: testground.Ground, core: kubernetes.client.CoreV1Api
) -> Iterator[dict[str, pathlib.Path]]:
    """Two nodes; kubenova installed by its chart and running under its own ServiceAccounts."""
    libvirt_host.start(ground.layout, OTHER, testground.node_address(OTHER))
    guest.ensure_images(ground.layout, ground.images(OTHER))  # as add_node does: the migration test boots one
    try:
        with (
            service_accounts.chart_installed(ground),
            service_accounts.running_as_service_accounts(ground, core, [ground.node, OTHER]) as configs,
        ):
            custom = kubernetes.client.CustomObjectsApi(core.api_client)
            for node in (ground.node, OTHER):
                eventually(
                    lambda n=node: [
                        o
                        for o in custom.list_cluster_custom_object(GROUP, VERSION, COMPUTENODES)["items"]
                        if o["metadata"]["name"] == n and o.get("status", {}).get("heartbeatTime")
                    ],
                    timeout=60,
                    what=f"the agent of {node} to report",
                )
            yield configs
    finally:
        testground.remove_node(ground, OTHER)


@pytest.fixture
def user(tenancy: dict[str, pathlib.Path], api_client: kubernetes.client.ApiClient, namespace: str) -> str:
    """The namespace user, with the built-in edit role (and kubenova-edit, as aggregation adds it)."""
    service_accounts.grant(api_client, namespace, USER, "edit")
    return USER


def kubectl(
    ground: testground.Ground, *args: str, who: str | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """kubectl as the admin, or as ``who`` (impersonated: the apiserver sees that user, no more)."""
    argv = [ground.kubectl, *args, *(["--as", who] if who else [])]
    return subprocess.run(argv, capture_output=True, text=True, env=ground.env(), input=stdin)


def refused(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0, f"allowed: {proc.stdout}"
    for word in words:
        assert word in proc.stderr, proc.stderr


def domains(ground: testground.Ground, uid: str) -> list[str]:
    """The nodes whose libvirt has a domain for the instance."""
    found = []
    for node in (ground.node, OTHER):
        conn = libvirt.open(libvirt_host.uri(ground.layout, node))
        try:
            conn.lookupByUUIDString(uid)
            found.append(node)
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
    return found


def running(custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str) -> tuple[str, str]:
    """(uid, node) of the instance once it runs."""
    obj = wait_ready(custom, namespace, name, timeout=180)
    return obj["metadata"]["uid"], obj["metadata"]["labels"][NODE_LABEL]


def started(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, body: dict[str, Any]
) -> tuple[str, str]:
    """Create the instance as the admin; (uid, node) once it runs."""
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)
    return running(custom, namespace, body["metadata"]["name"])


def elsewhere(ground: testground.Ground, node: str) -> str:
    return OTHER if node == ground.node else ground.node


def as_node(config: pathlib.Path) -> tuple[kubernetes.client.CustomObjectsApi, kubernetes.client.CoreV1Api]:
    client = kubernetes.config.new_client_from_config(config_file=str(config))
    return kubernetes.client.CustomObjectsApi(client), kubernetes.client.CoreV1Api(client)


def forbidden(call: Any, *words: str) -> None:
    with pytest.raises(kubernetes.client.ApiException) as denied:
        call()
    assert denied.value.status == 403, denied.value
    for word in words:
        assert word in denied.value.body, denied.value.body


def test_a_namespace_user_can_run_a_vm_but_never_bind_move_or_unbind_it(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str, user: str
) -> None:
    created = kubectl(ground, "create", "-n", namespace, "-f", "-", who=user, stdin=yaml_of(make("vm")))
    assert created.returncode == 0, created.stderr
    uid, node = running(custom, namespace, "vm")
    other = elsewhere(ground, node)

    # The label edit that started a second copy on the other node.
    label = f"{NODE_LABEL}={other}"
    refused(
        kubectl(ground, "label", "-n", namespace, "vi", "vm", label, "--overwrite", who=user),
        "kubenova-binding",
        "metadata.labels under compute.kubenova.io/ are kubenova's",
    )
    refused(kubectl(ground, "label", "-n", namespace, "vi", "vm", f"{NODE_LABEL}-", who=user), "labels")
    refused(
        kubectl(ground, "label", "-n", namespace, "vi", "vm", f"{MIGRATION_TARGET_LABEL}={other}", who=user),
        "labels",
    )
    # The finalizer removal that, with a delete, left a VM running with no object at all.
    unfinalize = '[{"op": "remove", "path": "/metadata/finalizers"}]'
    refused(
        kubectl(ground, "patch", "-n", namespace, "vi", "vm", "--type=json", "-p", unfinalize, who=user),
        "metadata.finalizers under compute.kubenova.io/ are kubenova's",
    )
    # Created already bound, or with status: refused too.
    bound = make("bound")
    bound["metadata"]["labels"] = {NODE_LABEL: other}
    refused(kubectl(ground, "create", "-n", namespace, "-f", "-", who=user, stdin=yaml_of(bound)), "labels")
    status = '{"status": {"node": "' + other + '"}}'
    refused(
        kubectl(
            ground,
            "patch",
            "-n",
            namespace,
            "vi",
            "vm",
            "--subresource=status",
            "--type=merge",
            "-p",
            status,
            who=user,
        ),
        "forbidden",
    )
    assert get(custom, namespace, "bound") is None
    obj = get(custom, namespace, "vm")
    assert obj and obj["metadata"]["labels"][NODE_LABEL] == node and obj["status"]["node"] == node
    assert domains(ground, uid) == [node]
    # What a VM owner needs still works: change the spec, delete.
    stop = '{"spec": {"powerState": "Stopped"}}'
    assert (
        kubectl(ground, "patch", "-n", namespace, "vi", "vm", "--type=merge", "-p", stop, who=user).returncode
        == 0
    )
    wait_ready(custom, namespace, "vm", power="Stopped")
    assert kubectl(ground, "delete", "-n", namespace, "vi", "vm", who=user).returncode == 0
    eventually(lambda: not domains(ground, uid), timeout=60, what="the domain to go")


def test_a_label_edit_forced_by_an_admin_still_runs_one_domain(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str, tenancy: Any
) -> None:
    uid, node = started(custom, namespace, make("vm"))
    other = elsewhere(ground, node)
    move = {"metadata": {"labels": {NODE_LABEL: other}}}
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, "vm", move)
    # The other node's agent sees it now, and says why it does not start it.
    obj = eventually(
        lambda: (
            (o := get(custom, namespace, "vm")) and cond(o, "Ready").get("reason") == "BoundElsewhere" and o
        ),
        timeout=60,
        what="the other node to refuse the instance",
    )
    assert f"runs on {node}" in cond(obj, "Ready")["message"]
    events = kubernetes.client.CoreV1Api(custom.api_client).list_namespaced_event(namespace).items
    assert any(
        e.reason == "BoundElsewhere" and e.source.component == f"kubenova-agent/{other}" for e in events
    )
    assert domains(ground, uid) == [node]
    # Put back, the node that runs it takes it again.
    back = {"metadata": {"labels": {NODE_LABEL: node}}}
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, "vm", back)
    wait_ready(custom, namespace, "vm")
    assert domains(ground, uid) == [node]


def test_a_node_writes_only_its_own_objects(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    namespace: str,
    tenancy: dict[str, pathlib.Path],
) -> None:
    uid, victim = started(custom, namespace, make("vm"))
    attacker = elsewhere(ground, victim)
    objects, secrets = as_node(tenancy[f"agent-{attacker}"])
    # Another node's ComputeNode: its migrationURI would redirect migrations.
    redirect = {"status": {"migrationURI": f"qemu+tcp://{attacker}/system"}}
    forbidden(
        lambda: objects.patch_cluster_custom_object_status(GROUP, VERSION, COMPUTENODES, victim, redirect),
        f"may write only its own ComputeNode, not {victim}",
    )
    # Fencing is an admin's word: a node fences neither another node (its instances would be stopped
    # there and started elsewhere) nor itself (its instances would start elsewhere while it runs them).
    for node in (victim, attacker):
        forbidden(
            lambda n=node: objects.patch_cluster_custom_object(
                GROUP, VERSION, COMPUTENODES, n, {"spec": {"fenced": True}}
            )
        )
    # Nor by naming a Kubernetes Node it does not run on (a missing Node is a fencing signal).
    forbidden(
        lambda: objects.patch_cluster_custom_object_status(
            GROUP, VERSION, COMPUTENODES, attacker, {"status": {"kubernetesNode": "gone"}}
        ),
        "may name only its own Node",
    )
    # An instance bound to another node: its status, its finalizer, its binding.
    forbidden(
        lambda: objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, VIRTUALINSTANCES, "vm", {"status": {"node": attacker}}
        ),
        "may write only objects bound to its node",
    )
    for meta in ({"finalizers": []}, {"labels": {NODE_LABEL: attacker}}):
        forbidden(
            lambda m=meta: objects.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, VIRTUALINSTANCES, "vm", {"metadata": m}
            ),
            f"is bound to {victim}",
        )
    # The controller's leader Lease and the other agent's heartbeat.
    coordination = kubernetes.client.CoordinationV1Api(objects.api_client)
    for lease in ("kubenova-controller", f"agent-{victim}"):
        forbidden(
            lambda name=lease: coordination.patch_namespaced_lease(
                name, LEASE_NAMESPACE, {"spec": {"holderIdentity": attacker}}
            ),
            "may write only its heartbeat Lease",
        )
    # Secrets: none read outside namespaces that opted in, no token Secret, no token at all.
    core.create_namespaced_secret(
        "kube-system", {"metadata": {"name": f"s-{namespace}"}, "stringData": {"k": "v"}}
    )
    try:
        forbidden(lambda: secrets.read_namespaced_secret(f"s-{namespace}", "kube-system"))
    finally:
        core.delete_namespaced_secret(f"s-{namespace}", "kube-system")
    service_accounts.opt_in(custom.api_client, namespace)
    token_secret = {
        "metadata": {
            "name": "stolen",
            "annotations": {"kubernetes.io/service-account.name": "default"},
            "labels": {f"{GROUP}/vnc-for": uid},
        },
        "type": "kubernetes.io/service-account-token",
    }
    forbidden(
        lambda: secrets.create_namespaced_secret(namespace, token_secret), "never a ServiceAccount token"
    )
    plain = {"metadata": {"name": "plain"}, "stringData": {"k": "v"}}
    forbidden(lambda: secrets.create_namespaced_secret(namespace, plain), "only the Opaque Secret")
    forbidden(
        lambda: secrets.create_namespaced_service_account_token(
            "kubenova-controller", LEASE_NAMESPACE, {"spec": {"expirationSeconds": 600}}
        )
    )
    # What is its own it may still write.
    current = custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, attacker)
    mine = {"status": {"hostname": current["status"]["hostname"]}}  # allowed, and changes nothing
    objects.patch_cluster_custom_object_status(GROUP, VERSION, COMPUTENODES, attacker, mine)
    # A token of the agent's ServiceAccount not bound to a pod on a node writes nothing at all.
    unbound, _ = as_node(service_accounts.kubeconfig(ground, core, "agent"))
    forbidden(
        lambda: unbound.patch_cluster_custom_object_status(GROUP, VERSION, COMPUTENODES, attacker, mine),
        "this token names none",
    )
    assert domains(ground, uid) == [victim]
    vm = get(custom, namespace, "vm") or {}
    assert vm["status"]["node"] == victim and vm["metadata"]["finalizers"]


def test_secrets_of_a_namespace_that_did_not_opt_in_are_not_read_and_the_fix_is_named(
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    namespace: str,
    tenancy: Any,
) -> None:
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "pw"}, "stringData": {"password": "s3cret"}}
    )
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, VIRTUALINSTANCES, make("vm", adminPasswordSecretRef={"name": "pw"})
    )
    obj = eventually(
        lambda: (
            (o := get(custom, namespace, "vm")) and cond(o, "Ready").get("reason") == "SecretForbidden" and o
        ),
        timeout=60,
        what="the agent to say it may not read the Secret",
    )
    assert "kubenova-agent-secrets" in cond(obj, "Ready")["message"]
    service_accounts.opt_in(custom.api_client, namespace)  # the namespace opts in: the VM starts
    wait_ready(custom, namespace, "vm", timeout=180)


def test_a_live_migration_moves_an_instance_between_two_nodes_each_writing_only_its_own(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str, user: str
) -> None:
    uid, source = started(custom, namespace, make("vm"))
    target = elsewhere(ground, source)
    migration = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Migration",
        "metadata": {"name": "move"},
        "spec": {"type": "Live", "instanceRef": {"name": "vm"}, "targetNode": target},
    }
    created = kubectl(ground, "create", "-n", namespace, "-f", "-", who=user, stdin=yaml_of(migration))
    assert created.returncode == 0, created.stderr
    done = eventually(
        lambda: (
            (m := custom.get_namespaced_custom_object(GROUP, VERSION, namespace, MIGRATIONS, "move"))
            .get("status", {})
            .get("phase")
            in ("Succeeded", "Failed")
            and m
        ),
        timeout=240,
        what="the migration to end",
    )
    assert done["status"]["phase"] == "Succeeded", done["status"]
    obj = wait_ready(custom, namespace, "vm")
    assert obj["metadata"]["labels"][NODE_LABEL] == target and obj["status"]["node"] == target
    assert MIGRATION_TARGET_LABEL not in obj["metadata"]["labels"]
    assert domains(ground, uid) == [target]


def test_two_namespaces_asking_for_the_same_volume_name_share_no_bytes(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    namespace: str,
    tenancy: Any,
) -> None:
    other_namespace = f"{namespace}-b"
    core.create_namespace({"metadata": {"name": other_namespace}})
    written = {}
    try:
        for ns in (namespace, other_namespace):
            pattern = f"KN-{ns}"
            body = make("vm")
            body["spec"]["boot"]["kernel"]["cmdline"] += f" {guest.write_hook('vda', pattern)}"
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, VIRTUALINSTANCES, body)
            attachment = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "VolumeAttachment",
                "metadata": {"name": "data"},
                "spec": {"instanceRef": {"name": "vm"}, "volume": {"name": "shared-name", "sizeGiB": 1}},
            }
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, VOLUMEATTACHMENTS, attachment)
            uid, node = running(custom, ns, "vm")
            eventually(
                lambda u=uid, n=node, p=pattern: f"{guest.WROTE} vda {p}" in console(ground, u, n),
                timeout=120,
                what=f"the guest of {ns} writing to its volume",
            )
            written[ns] = (ground.volume_store(node) / ns / "shared-name", pattern)
        for path, pattern in written.values():
            with open(path, "rb") as f:
                assert f.read(len(pattern)) == pattern.encode(), path
    finally:
        empty_namespace(custom, other_namespace)
        for path, _ in written.values():
            path.unlink(missing_ok=True)


def test_a_snapshot_boots_in_its_own_namespace_only(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    namespace: str,
    tenancy: Any,
) -> None:
    image = f"snap-{namespace}.qcow2"
    body = make("img", boot={"image": {"name": guest.DISK_IMAGE}}, rootDisk={"sizeGiB": 1})
    started(custom, namespace, body)
    patch_spec(custom, namespace, "img", {"actions": {"snapshot": {"id": "s", "imageName": image}}})
    assert wait_action(custom, namespace, "img", "snapshot", "s", timeout=180)["phase"] == "Succeeded"
    other_namespace = f"{namespace}-b"
    core.create_namespace({"metadata": {"name": other_namespace}})
    try:
        # Another namespace names it: not found, as if it did not exist (it does not, for that namespace).
        stranger = make("stranger", boot={"image": {"name": image}})
        custom.create_namespaced_custom_object(GROUP, VERSION, other_namespace, VIRTUALINSTANCES, stranger)
        failed = eventually(
            lambda: (
                (o := get(custom, other_namespace, "stranger"))
                and o.get("status", {}).get("phase") == "Failed"
                and o
            ),
            timeout=60,
            what="the other namespace's instance to fail",
        )
        assert "spec.boot.image.name" in cond(failed, "Ready")["message"]
        assert not domains(ground, failed["metadata"]["uid"])
        # Its own namespace boots it.
        mine = make("clone", boot={"image": {"name": image}})
        started(custom, namespace, mine)
    finally:
        empty_namespace(custom, other_namespace)
        (ground.snapshots(namespace) / image).unlink(missing_ok=True)


def test_a_network_not_open_to_the_namespace_is_refused_naming_the_field(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str, tenancy: Any
) -> None:
    nics = [{"name": "eth0", "network": libvirt_host.NETWORK}, {"name": "eth1", "network": "host-bridge"}]
    uid = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, VIRTUALINSTANCES, make("vm", interfaces=nics)
    )["metadata"]["uid"]
    failed = eventually(
        lambda: (o := get(custom, namespace, "vm")) and o.get("status", {}).get("phase") == "Failed" and o,
        timeout=60,
        what="the instance to fail on its network",
    )
    message = cond(failed, "Ready")["message"]
    assert "spec.interfaces[1].network" in message and "'host-bridge' is not open to namespace" in message
    assert not domains(ground, uid)


def console(ground: testground.Ground, uid: str, node: str) -> str:
    path = ground.console_log(uid, node)
    return path.read_text(errors="replace") if path.exists() else ""


def yaml_of(body: dict[str, Any]) -> str:
    """A manifest for kubectl (JSON is YAML)."""
    return json.dumps(body)
