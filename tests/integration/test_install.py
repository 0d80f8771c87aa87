"""Installing kubenova: Helm and kustomize against the real apiserver, each component running with
its own ServiceAccount's token, and VMs driven by the kubectl plugin."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator

import kubernetes
import pytest
import yaml

from kubenova.handlers.shared import GROUP, LEASE_NAMESPACE, VERSION
from testground import ground as testground
from testground import guest, kube
from tests.helpers import eventually, vnc_auth
from tests.integration import service_accounts

REPO = kube.REPO
CHART = REPO / "charts" / "kubenova"
RELEASE = "kubenova"
#: helm template has no cluster to ask for its version; the chart needs >= 1.30.
TEMPLATE = ["template", RELEASE, str(CHART), "--kube-version", "1.36.0"]


@pytest.fixture(scope="module")
def helm() -> str:
    return str(kube.build_helm())


def run(
    argv: list[str], ground: testground.Ground, check: bool = True, **env: str
) -> subprocess.CompletedProcess[str]:
    bin_dir = pathlib.Path(sys.executable).parent  # kubectl-kubenova, for `kubectl kubenova`
    environment = {**ground.env(), **env}
    environment["PATH"] = f"{bin_dir}:{environment['PATH']}"
    proc = subprocess.run(argv, capture_output=True, text=True, env=environment)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return proc


def test_the_chart_lints_clean_and_the_generated_files_are_current(
    helm: str, ground: testground.Ground
) -> None:
    run([helm, "lint", "--strict", str(CHART)], ground)
    run([sys.executable, str(REPO / "hack" / "gen_deploy.py"), "--check", helm], ground)


def test_invalid_values_fail_on_the_schema_with_the_field_named(helm: str, ground: testground.Ground) -> None:
    for setting, field in (
        ("agent.domainType=xen", "domainType"),
        ("controller.replicas=0", "replicas"),
        ("agent.imageStore=relative/path", "imageStore"),
        ("agnet.domainType=kvm", "agnet"),
    ):
        proc = run([helm, *TEMPLATE, "--set", setting], ground, check=False)
        assert proc.returncode != 0 and "values don't meet the specifications of the schema" in proc.stderr, (
            setting
        )
        assert field in proc.stderr, proc.stderr
    for settings, fix in (
        (["agent.libvirt.mode=sidecar"], "set agent.libvirt.sidecar.image"),
        (
            ["agent.libvirt.mode=sidecar", "agent.libvirt.sidecar.image=x"],
            "set agent.migrationTLS.secretName",
        ),
        (
            ["agent.migrationTLS.certManager.issuerRef.name=ca"],
            "cert-manager (cert-manager.io/v1) is not installed",
        ),
        (["agent.migrationTLS.insecure=yes"], "insecure"),
    ):
        proc = run([helm, *TEMPLATE, *(f"--set={s}" for s in settings)], ground, check=False)
        assert proc.returncode != 0 and fix in proc.stderr, proc.stderr


def test_every_manifest_is_accepted_by_the_apiserver(helm: str, ground: testground.Ground) -> None:
    run([ground.kubectl, "apply", "--dry-run=server", "-k", str(REPO / "deploy")], ground)
    for values in (
        [],
        [
            "--set=agent.libvirt.mode=sidecar",
            "--set=agent.libvirt.sidecar.image=libvirtd:x",
            "--set=agent.migrationTLS.secretName=kubenova-migration-tls",
        ],
        ["--set=agent.migrationTLS.insecure=true"],
    ):
        rendered = run([helm, *TEMPLATE, "--namespace", LEASE_NAMESPACE, *values], ground).stdout
        proc = subprocess.run(
            [ground.kubectl, "apply", "--dry-run=server", "-f", "-"],
            input=rendered,
            capture_output=True,
            text=True,
            env=ground.env(),
        )
        assert proc.returncode == 0, proc.stderr


def test_with_cert_manager_the_chart_asks_for_the_migration_certificate(
    helm: str, ground: testground.Ground
) -> None:
    """One certificate, server and client, for the names and addresses given; the agents mount its Secret."""
    rendered = run(
        [
            helm,
            *TEMPLATE,
            "--set=agent.migrationTLS.secretName=kubenova-migration-tls",
            "--set=agent.migrationTLS.certManager.issuerRef.name=kubenova-ca",
            "--set=agent.migrationTLS.certManager.issuerRef.kind=ClusterIssuer",
            "--set=agent.migrationTLS.certManager.ipAddresses={10.0.0.1,10.0.0.2}",
            "--api-versions=cert-manager.io/v1",
        ],
        ground,
    ).stdout
    documents = [d for d in yaml.safe_load_all(rendered) if d]
    (certificate,) = (d for d in documents if d["kind"] == "Certificate")
    assert certificate["spec"]["secretName"] == "kubenova-migration-tls"
    assert certificate["spec"]["issuerRef"] == {"name": "kubenova-ca", "kind": "ClusterIssuer"}
    assert certificate["spec"]["ipAddresses"] == ["10.0.0.1", "10.0.0.2"]
    assert {"server auth", "client auth"} <= set(certificate["spec"]["usages"])
    (agent,) = (d for d in documents if d["kind"] == "DaemonSet")
    pod = agent["spec"]["template"]["spec"]
    assert {"name": "migration-pki", "mountPath": "/etc/kubenova/migration-pki", "readOnly": True} in pod[
        "containers"
    ][0]["volumeMounts"]
    assert "--migration-pki-dir=/etc/kubenova/migration-pki" in pod["containers"][0]["args"]


@pytest.fixture(scope="module")
def installed(
    helm: str, ground: testground.Ground, core: kubernetes.client.CoreV1Api
) -> Iterator[dict[str, pathlib.Path]]:
    """The chart installed; each component's kubeconfig holds only its ServiceAccount's token."""
    with service_accounts.chart_installed(ground):
        yield {
            "controller": service_accounts.kubeconfig(ground, core, "controller"),
            "agent": service_accounts.kubeconfig(ground, core, "agent", ground.node),
        }


def test_each_service_account_can_do_exactly_its_listed_verbs(
    ground: testground.Ground, installed: dict[str, pathlib.Path]
) -> None:
    for component, config in installed.items():
        got = run(
            [ground.kubectl, "auth", "can-i", "--list", "--namespace", LEASE_NAMESPACE],
            ground,
            KUBECONFIG=str(config),
        ).stdout
        expected = (REPO / "deploy" / "rbac" / f"{component}.txt").read_text()
        # The rows are what matters; kubectl groups them in an order that follows the rules' order.
        assert sorted(got.splitlines()) == sorted(expected.splitlines()), (
            f"kubectl auth can-i --list for kubenova-{component} changed:\n{got}"
        )


def kubenova_rows(listed: str) -> list[str]:
    """kubenova's rows of `kubectl auth can-i --list`, without what depends on the other rows and on
    how the rules were put together: the padding, and the order of the verbs."""
    rows = []
    for row in listed.splitlines():
        found = re.match(r"(\S+)\s+(\[[^]]*\])\s+(\[[^]]*\])\s+\[([^]]*)\]", row)
        if found and GROUP in found[1]:
            rows.append(f"{found[1]} {found[2]} {found[3]} [{' '.join(sorted(found[4].split()))}]")
    return sorted(rows)


def expected_rows(role: str) -> list[str]:
    return kubenova_rows((REPO / "deploy" / "rbac" / f"user-{role}.txt").read_text())


def test_namespace_users_get_kubenova_through_the_built_in_roles_and_nothing_above(
    ground: testground.Ground,
    installed: dict[str, pathlib.Path],
    namespace: str,
    api_client: kubernetes.client.ApiClient,
) -> None:
    """view, edit and admin in one namespace: kubenova's rows of `kubectl auth can-i --list`
    (aggregation bound by hand here: see service_accounts.AGGREGATED)."""
    for role in ("view", "edit", "admin"):
        user = f"{role}-user"
        service_accounts.grant(api_client, namespace, user, role)

        def listed(user: str = user) -> str:
            return run(
                [ground.kubectl, "auth", "can-i", "--list", "-n", namespace, "--as", user], ground
            ).stdout

        eventually(  # RBAC's caches see the new bindings within a moment
            lambda r=role, listed=listed: kubenova_rows(listed()) == expected_rows(r),
            timeout=30,
            what=f"kubenova's rows of can-i --list for {role} as in deploy/rbac/user-{role}.txt",
        )
        # What no namespace user gets of kubenova, whatever the role: status, ComputeNodes, other namespaces.
        for verb, resource, *more in (
            ("patch", "virtualinstances", "--subresource=status"),
            ("update", "migrations", "--subresource=status"),
            ("create", "computenodes"),
            ("patch", "computenodes"),
            ("get", "virtualinstances", "-n", "kube-system"),
        ):
            argv = [ground.kubectl, "auth", "can-i", verb, resource, "-n", namespace, *more, "--as", user]
            answer = run(argv, ground, check=False).stdout.strip()
            assert answer == "no", (role, verb, resource, more)
    can_edit = run(
        [ground.kubectl, "auth", "can-i", "create", "virtualinstances", "-n", namespace, "--as", "edit-user"],
        ground,
    )
    assert can_edit.stdout.strip() == "yes"


def test_controller_and_agent_run_the_lifecycle_with_their_own_tokens_through_the_plugin(
    ground: testground.Ground,
    installed: dict[str, pathlib.Path],
    namespace: str,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
) -> None:
    """The test ground's admin-run processes give way to the same processes holding only their tokens."""
    service_accounts.opt_in(custom.api_client, namespace)  # the VNC password's Secret
    with service_accounts.running_as_service_accounts(ground, core, [ground.node]):
        plugin = ["kubectl", "kubenova", "-n", namespace, "--timeout", "180"]
        out = run(
            [*plugin, "create", "vm", "--memory", "96", "--image", guest.DISK_IMAGE, "--vnc"], ground
        ).stdout
        assert f"vm is Running on {ground.node}" in out
        for verb, state in (
            ("pause", "Paused"),
            ("unpause", "Running"),
            ("suspend", "Suspended"),
            ("resume", "Running"),
            ("stop", "Stopped"),
            ("start", "Running"),
        ):
            assert run([*plugin, verb, "vm"], ground).stdout.strip() == f"vm is {state}", verb
        refused = run([*plugin, "unpause", "vm"], ground, check=False)
        assert refused.returncode == 1 and refused.stderr.strip() == "error: cannot unpause vm: it is Running"
        assert "rebooted (hard)" in run([*plugin, "reboot", "--hard", "vm"], ground).stdout
        assert "node" in run([*plugin, "diag", "vm"], ground).stdout
        check_vnc(ground, plugin, custom, namespace)
        image = f"plugin-{namespace}.qcow2"
        assert (
            f"image {image} is among the namespace's snapshots in the image store"
            in run([*plugin, "snapshot", "vm", image], ground).stdout
        )
        assert (ground.snapshots(namespace) / image).is_file()
        (ground.snapshots(namespace) / image).unlink()
        assert (
            run([*plugin, "rescue", "vm", "--image", guest.RESCUE_IMAGE], ground).stdout.strip()
            == "vm is Rescued"
        )
        assert run([*plugin, "unrescue", "vm"], ground).stdout.strip() == "vm is Running"
        nowhere = run([*plugin, "migrate", "vm", "--live", "--to", "nowhere"], ground, check=False)
        assert nowhere.returncode == 1 and "no ComputeNode is called 'nowhere'" in nowhere.stderr
        instances = ground.node_dir() / "instances"
        eventually(
            lambda: (
                guest.BOOT_MARKER
                in run([*plugin, "console", "--instances-dir", str(instances), "vm"], ground).stdout
            ),
            timeout=120,
            what="the console after the reboot",
        )
        assert run([*plugin, "delete", "vm"], ground).stdout.strip() == "vm deleted"
        missing = run([*plugin, "stop", "vm"], ground, check=False)
        assert (
            missing.returncode == 1
            and missing.stderr.strip() == f"error: VirtualInstance 'vm' not found in namespace {namespace}"
        )
        # Nothing was done as admin: the object's writers are the two components' ServiceAccounts.
        events = kubernetes.client.CoreV1Api(custom.api_client).list_namespaced_event(namespace).items
        assert any(e.reason == "Deleted" for e in events)


def check_vnc(
    ground: testground.Ground, plugin: list[str], custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    """`kubectl kubenova vnc` forwards a loopback port to the guest's VNC server, which wants the password."""
    vi = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "virtualinstances", "vm")
    assert vi["status"]["vnc"]["host"] == "127.0.0.1", "the VNC server listens on the node's loopback only"
    environment = {**ground.env(), "PATH": f"{pathlib.Path(sys.executable).parent}:{ground.env()['PATH']}"}
    forward = subprocess.Popen(
        [*plugin, "vnc", "vm", "--on-node"], stdout=subprocess.PIPE, text=True, env=environment
    )
    try:
        line = forward.stdout.readline() if forward.stdout else ""
        address, _, password = line.split()[:3]
        assert password and password not in yaml.safe_dump(vi), "the password is only in its Secret"
        host, port = address.removeprefix("vnc://").rsplit(":", 1)
        assert host == "127.0.0.1" and vnc_auth(host, int(port), password)
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def test_helm_upgrade_changes_the_workloads_and_uninstall_removes_them(
    helm: str,
    ground: testground.Ground,
    installed: dict[str, pathlib.Path],
    api_client: kubernetes.client.ApiClient,
) -> None:
    apps = kubernetes.client.AppsV1Api(api_client)
    run(
        [
            helm,
            "upgrade",
            RELEASE,
            str(CHART),
            "--namespace",
            LEASE_NAMESPACE,
            "--set",
            "controller.maxMigrations=3",
            "--set",
            "agent.domainType=qemu",
            "--wait=false",
        ],
        ground,
    )
    controller = apps.read_namespaced_deployment("kubenova-controller", LEASE_NAMESPACE)
    assert "--max-migrations=3" in controller.spec.template.spec.containers[0].args
    agent = apps.read_namespaced_daemon_set("kubenova-agent", LEASE_NAMESPACE)
    assert "--domain-type=qemu" in agent.spec.template.spec.containers[0].args
    assert agent.spec.template.spec.service_account_name == "kubenova-agent"
    run([helm, "uninstall", RELEASE, "--namespace", LEASE_NAMESPACE], ground)
    eventually(
        lambda: (
            not apps.list_namespaced_deployment(LEASE_NAMESPACE).items
            and not apps.list_namespaced_daemon_set(LEASE_NAMESPACE).items
        ),
        timeout=30,
        what="the workloads to be gone",
    )
    core = kubernetes.client.CoreV1Api(api_client)
    assert not [
        sa
        for sa in core.list_namespaced_service_account(LEASE_NAMESPACE).items
        if sa.metadata.name.startswith("kubenova-")
    ]
    # Helm never deletes CRDs (nor, so, anyone's VMs).
    assert (
        kubernetes.client.ApiextensionsV1Api(api_client)
        .read_custom_resource_definition(f"virtualinstances.{GROUP}")
        .spec.versions[0]
        .name
        == VERSION
    )


def test_the_sample_values_render_for_kind(helm: str, ground: testground.Ground) -> None:
    values = REPO / "deploy" / "kind" / "values.yaml"
    rendered = run([helm, *TEMPLATE, "-f", str(values)], ground).stdout
    assert "--domain-type=qemu" in rendered and "image: localhost/kubenova:0.1.0" in rendered
    cluster = yaml.safe_load((REPO / "deploy" / "kind" / "cluster.yaml").read_text())
    assert (cluster["kind"], cluster["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    assert {n["role"] for n in cluster["nodes"]} == {"control-plane", "worker"}
    makefile = (REPO / "Makefile").read_text()
    assert (
        "kind load docker-image localhost/kubenova:0.1.0" in makefile
        and "-f deploy/kind/values.yaml" in makefile
    )
