"""Console, VNC and port-forward from a laptop: the plugin, with a kubeconfig that holds only a namespace
user's client certificate, through the kube-apiserver, the access API server (the chart's Deployment,
reached through its Service and kube-proxy) and the agent of the VM's node.

The user has the built-in `edit` role in one namespace, which kube-controller-manager aggregates with the
chart's roles; another user has only `view`. The attacker cases: another namespace, `view`, and a request
that skips the kube-apiserver and writes the front proxy's headers itself.
"""

from __future__ import annotations

import base64
import pathlib
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import kubernetes
import pytest

from kubenova.handlers.shared import GROUP, LEASE_NAMESPACE, VERSION, VIRTUALINSTANCES
from testground import cluster, guest, kube, procs
from testground import ground as testground
from tests.cluster.test_cluster_mode import ready_pod
from tests.helpers import eventually, vnc_auth
from tests.integration import service_accounts
from tests.integration.test_agent import delete_and_wait, wait_ready
from tests.integration.test_node_network import wait_leased
from tests.integration.test_virtualinstance import make

pytestmark = pytest.mark.cluster

PLUGIN = str(pathlib.Path(sys.executable).parent / "kubectl-kubenova")
SUBRESOURCES = "subresources.compute.kubenova.io"


class Plugin:
    """The plugin as a user runs it, its output gathered as it comes (a console never ends by itself)."""

    def __init__(self, ground: testground.Ground, kubeconfig: pathlib.Path, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [PLUGIN, "--kubeconfig", str(kubeconfig), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=ground.env(),
        )
        self.output = bytearray()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):  # type: ignore[attr-defined]
            self.output.extend(chunk)

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait_for(self, pattern: str, timeout: float, what: str) -> re.Match[str]:
        return eventually(lambda: re.search(pattern, self.text()), timeout, 0.2, what + f" ({self.text()!r})")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=20)


def run_plugin(
    ground: testground.Ground, kubeconfig: pathlib.Path, *argv: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PLUGIN, "--kubeconfig", str(kubeconfig), *argv],
        capture_output=True,
        text=True,
        env=ground.env(),
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def user_kubeconfig(ground: testground.Ground, user: str) -> pathlib.Path:
    """A kubeconfig with only ``user``'s client certificate, as a cluster admin hands one out."""
    pki = kube.ensure_pki(ground.layout)
    kube.issue_cert(pki, user, f"/CN={user}")
    return kube.kubeconfig(ground.layout.state / f"{user}.kubeconfig", pki, user, cluster.NODE_IP)


def bind(api_client: kubernetes.client.ApiClient, namespace: str, user: str, role: str) -> None:
    """The built-in ``role`` alone: kube-controller-manager aggregates the chart's roles into it."""
    service_accounts.bind_user(api_client, namespace, user, role)


@pytest.fixture(scope="module")
def installed(ground: testground.Ground, core: kubernetes.client.CoreV1Api) -> Iterator[None]:
    helm = kube.build_helm()
    cluster.helm_install(ground.layout, helm, ground.env(), ground.node, ground.image_store)
    ready_pod(core, "agent")
    ready_pod(core, "controller")
    ready_pod(core, "access")
    yield
    procs.run(
        [str(helm), "uninstall", cluster.RELEASE, "--namespace", LEASE_NAMESPACE, "--wait"],
        "helm uninstall",
        "",
        env=ground.env(),
    )


def available(ground: testground.Ground) -> bool:
    proc = subprocess.run(
        [ground.kubectl, "get", "apiservice", f"v1alpha1.{SUBRESOURCES}", "-o",
         "jsonpath={.status.conditions[?(@.type=='Available')].status}"],
        capture_output=True, text=True, env=ground.env(),
    )  # fmt: skip
    return proc.stdout.strip() == "True"


def test_console_vnc_and_port_forward_from_a_laptop_as_a_namespace_editor(
    ground: testground.Ground,
    installed: None,
    core: kubernetes.client.CoreV1Api,
    custom: kubernetes.client.CustomObjectsApi,
    api_client: kubernetes.client.ApiClient,
    namespace: str,
) -> None:
    eventually(lambda: available(ground), 120, 1, "the APIService Available")
    service_accounts.opt_in(api_client, namespace)  # the agent may make the VNC password's Secret
    body = make("web", vnc={"enabled": True})
    body["spec"]["boot"]["kernel"]["cmdline"] += f" {guest.SHELL_ARG}"
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)
    wait_ready(custom, namespace, "web", timeout=180)
    wait_leased(custom, namespace, "web")
    alice, bob = user_kubeconfig(ground, "alice"), user_kubeconfig(ground, "bob")
    bind(api_client, namespace, "alice", "edit")
    bind(api_client, namespace, "bob", "view")
    resource = f"virtualinstances.{SUBRESOURCES}"
    for user, answer in (("alice", "yes"), ("bob", "no")):
        can = eventually(
            lambda u=user, a=answer: (
                (
                    r := subprocess.run(
                        [
                            ground.kubectl,
                            "auth",
                            "can-i",
                            "create",
                            resource,
                            "--subresource=console",
                            "-n",
                            namespace,
                            "--as",
                            u,
                        ],
                        capture_output=True,
                        text=True,
                        env=ground.env(),
                    )  # fmt: skip
                ).stdout.strip()
                == a
                and r
            ),
            60,
            1,
            f"can-i create {resource}/console as {user}: {answer}",
        )
        assert can.stdout.strip() == answer

    # The boot log, then the interactive console: a command typed into the guest's shell runs there.
    log = eventually(
        lambda: (
            (r := run_plugin(ground, alice, "-n", namespace, "console", "web", "--log")).returncode == 0
            and guest.BOOT_MARKER in r.stdout
            and r
        ),
        60,
        2,
        "the boot log through the apiserver",
    )
    assert guest.BOOT_MARKER in log.stdout
    console = Plugin(ground, alice, "-n", namespace, "console", "web")
    try:
        console.wait_for("Connected to web", 30, "the console's greeting")
        started = time.monotonic()
        console.send(b"echo kubenova-typed-$((6*7))\n")
        console.wait_for(r"kubenova-typed-42", 30, "the guest's answer to a typed command")
        print(f"console: typed command answered in {time.monotonic() - started:.2f}s")
        console.send(b"\x1d")  # Ctrl-]
        assert console.proc.wait(timeout=20) == 0, console.text()
    finally:
        console.stop()

    # VNC: a local port through the apiserver; a full RFB handshake with the password of the Secret.
    secret = core.read_namespaced_secret("web-vnc", namespace).data["password"]
    password = base64.b64decode(secret).decode()
    vnc = Plugin(ground, alice, "-n", namespace, "vnc", "web", "--no-viewer")
    try:
        port = int(vnc.wait_for(r"127\.0\.0\.1:(\d+)", 30, "the local VNC port")[1])
        assert vnc_auth("127.0.0.1", port, password), "the guest's VNC server accepts its password"
    finally:
        vnc.stop()

    # port-forward: the guest's web server, on a local port.
    forward = Plugin(ground, alice, "-n", namespace, "port-forward", "web", ":80")
    try:
        local = int(forward.wait_for(r"Forwarding from 127\.0\.0\.1:(\d+) -> 80", 30, "the forward")[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{local}/", timeout=20) as reply:
            assert reply.read().decode().startswith(guest.HTTP)
    finally:
        forward.stop()

    # Refused: another namespace, a viewer, and headers forged by anyone but the kube-apiserver.
    other = run_plugin(ground, alice, "-n", "kube-system", "console", "web", "--log")
    assert other.returncode != 0 and "Forbidden" in other.stderr + other.stdout, other
    viewer = run_plugin(ground, bob, "-n", namespace, "console", "web", "--log")
    assert viewer.returncode != 0 and "Forbidden" in viewer.stderr + viewer.stdout, viewer
    service = core.read_namespaced_service("kubenova-access", LEASE_NAMESPACE)
    forged = urllib.request.Request(
        f"https://{service.spec.cluster_ip}/apis/{SUBRESOURCES}/v1alpha1/namespaces/{namespace}"
        "/virtualinstances/web/console?log=true",
        headers={"X-Remote-User": "alice", "X-Remote-Group": "system:masters"},
    )
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged, timeout=10, context=insecure)
    assert refused.value.code == 401
    anonymous = urllib.request.Request(  # through the kube-apiserver, with no credentials at all
        f"https://{cluster.NODE_IP}:{kube.APISERVER_PORT}/apis/{SUBRESOURCES}/v1alpha1/namespaces/{namespace}"
        "/virtualinstances/web/console?log=true"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(anonymous, timeout=10, context=insecure)
    assert refused.value.code in (401, 403), refused.value.code
    delete_and_wait(custom, namespace, "web")
