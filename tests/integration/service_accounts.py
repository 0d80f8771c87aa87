"""kubenova installed by its chart, its components run as local processes holding only their own
ServiceAccounts' tokens, the way a cluster runs them: each agent's token is bound to a pod on its node,
so the apiserver knows which node speaks (the test ground has no kubelet to make those pods run; the
token needs only the pod object)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator, Sequence

import kubernetes
import yaml

from kubenova.handlers.shared import GROUP, LEASE_NAMESPACE
from testground import ground as testground
from testground import kube, procs
from tests.helpers import eventually

CHART = kube.REPO / "charts" / "kubenova"
RELEASE = "kubenova"
#: Long enough for any test module; a token dies with its pod anyway.
TOKEN_SECONDS = 6 * 3600


def helm(ground: testground.Ground, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(kube.build_helm()), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, env=ground.env())
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return proc


@contextlib.contextmanager
def chart_installed(ground: testground.Ground) -> Iterator[None]:
    """The chart's RBAC and admission policies (its workloads stay pods without a kubelet)."""
    helm(ground, "install", RELEASE, str(CHART), "--namespace", LEASE_NAMESPACE, "--wait=false")
    try:
        yield
    finally:
        with contextlib.suppress(AssertionError):
            helm(ground, "uninstall", RELEASE, "--namespace", LEASE_NAMESPACE)


def agent_pod(core: kubernetes.client.CoreV1Api, node: str) -> str:
    """A pod of the agent's ServiceAccount bound to ``node``: what its token is bound to."""
    name = f"kubenova-agent-{node}"
    with contextlib.suppress(kubernetes.client.ApiException):
        core.delete_namespaced_pod(name, LEASE_NAMESPACE, grace_period_seconds=0)
    pod = {
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "serviceAccountName": "kubenova-agent",
            "automountServiceAccountToken": False,
            "containers": [{"name": "agent", "image": "localhost/kubenova"}],
        },
    }
    try:
        core.create_namespaced_pod(LEASE_NAMESPACE, pod)
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:  # 409: an earlier one is still there, and binds a token as well
            raise
    return name


def kubeconfig(
    ground: testground.Ground, core: kubernetes.client.CoreV1Api, component: str, node: str | None = None
) -> pathlib.Path:
    """A kubeconfig with a fresh token of kubenova-<component> (TokenRequest); an agent's is bound to a
    pod on ``node``."""
    spec = kubernetes.client.V1TokenRequestSpec(audiences=[], expiration_seconds=TOKEN_SECONDS)
    if node is not None:
        spec.bound_object_ref = kubernetes.client.V1BoundObjectReference(
            kind="Pod", api_version="v1", name=agent_pod(core, node)
        )
    token = core.create_namespaced_service_account_token(
        f"kubenova-{component}", LEASE_NAMESPACE, kubernetes.client.AuthenticationV1TokenRequest(spec=spec)
    ).status.token
    cluster = yaml.safe_load(ground.layout.kubeconfig.read_text())["clusters"][0]["cluster"]
    who = f"{component}-{node}" if node else component
    path = ground.layout.state / f"sa-{who}.kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": who,
                "clusters": [{"name": "ground", "cluster": cluster}],
                "users": [{"name": who, "user": {"token": token}}],
                "contexts": [{"name": who, "context": {"cluster": "ground", "user": who}}],
            }
        )
    )
    return path


def opt_in(api_client: kubernetes.client.ApiClient, namespace: str) -> None:
    """What a namespace's admin does so that the agent may read and make the Secrets its VMs use."""
    kubernetes.client.RbacAuthorizationV1Api(api_client).create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "kubenova-agent-secrets"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "kubenova-agent-secrets",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "kubenova-agent", "namespace": LEASE_NAMESPACE}],
        },
    )
    allowed(
        api_client, f"system:serviceaccount:{LEASE_NAMESPACE}:kubenova-agent", namespace, "create", "secrets"
    )


@contextlib.contextmanager
def running_as_service_accounts(
    ground: testground.Ground, core: kubernetes.client.CoreV1Api, nodes: Sequence[str]
) -> Iterator[dict[str, pathlib.Path]]:
    """The controller and the agents of ``nodes`` (their libvirt hosts running) with their own tokens
    instead of the test ground's admin; afterwards the test ground's own processes again. Yields each
    process's kubeconfig: "controller", "agent-<node>"."""
    for name in ("controller", *(f"agent-{node}" for node in nodes)):
        procs.stop(ground.layout, name)
    configs = {"controller": kubeconfig(ground, core, "controller")}
    commands = {
        "controller": ([sys.executable, "-m", "kubenova.cli", "controller"], "kubenova.cli controller")
    }
    for node in nodes:
        configs[f"agent-{node}"] = kubeconfig(ground, core, "agent", node)
        commands[f"agent-{node}"] = testground.agent_process(ground, node)
    try:
        for name, (argv, marker) in commands.items():
            procs.start(
                ground.layout,
                f"sa-{name}",
                argv,
                marker,
                env={**os.environ, "KUBECONFIG": str(configs[name])},
            )
        yield configs
    finally:
        for name in commands:
            procs.stop(ground.layout, f"sa-{name}")
        for node in nodes:
            with contextlib.suppress(kubernetes.client.ApiException):
                core.delete_namespaced_pod(f"kubenova-agent-{node}", LEASE_NAMESPACE, grace_period_seconds=0)
        testground.start_kubenova(ground)


#: What each built-in role holds of kubenova once kube-controller-manager has aggregated the chart's
#: roles into it (view into edit, edit into admin). The default test ground runs no
#: kube-controller-manager, so its tests bind these; cluster mode checks the real aggregation.
AGGREGATED = {
    "view": ("kubenova-view",),
    "edit": ("kubenova-view", "kubenova-edit"),
    "admin": ("kubenova-view", "kubenova-edit", "kubenova-admin"),
}


def grant(api_client: kubernetes.client.ApiClient, namespace: str, user: str, role: str) -> None:
    """Give ``user`` the built-in ``role`` in ``namespace``, with kubenova's part of it bound as
    aggregation would add it."""
    for cluster_role in (role, *AGGREGATED[role]):
        bind_user(api_client, namespace, user, cluster_role)
    allowed(api_client, user, namespace, "get", "virtualinstances", GROUP)


def allowed(
    api_client: kubernetes.client.ApiClient,
    user: str,
    namespace: str,
    verb: str,
    resource: str,
    group: str = "",
) -> None:
    """Wait until ``user`` may ``verb`` ``resource`` in ``namespace``. The apiserver's RBAC authorizer
    reads bindings from a cache: until it has seen a new one, requests are still refused, and a test
    would see RBAC's refusal instead of the one it plays."""
    review = {
        "spec": {
            "user": user,
            "resourceAttributes": {
                "namespace": namespace,
                "verb": verb,
                "resource": resource,
                "group": group,
            },
        }
    }
    authorization = kubernetes.client.AuthorizationV1Api(api_client)
    eventually(
        lambda: authorization.create_subject_access_review(review).status.allowed,
        timeout=30,
        what=f"{user} to be allowed to {verb} {resource} in {namespace}",
    )


def bind_user(api_client: kubernetes.client.ApiClient, namespace: str, user: str, cluster_role: str) -> None:
    """A RoleBinding named <user>-<cluster role> giving ``user`` the ClusterRole in ``namespace``."""
    kubernetes.client.RbacAuthorizationV1Api(api_client).create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": f"{user}-{cluster_role}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
            "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
        },
    )
