"""etcd and kube-apiserver: by default the way envtest runs them (no kubelet, no scheduler); cluster mode
adds those in testground.cluster."""

from __future__ import annotations

import os
import pathlib
import ssl
import subprocess
import urllib.error
import urllib.request

import yaml

from testground import access, procs
from testground.procs import Layout, TestGroundError

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every port the test ground listens on is below Linux's ephemeral range (32768-60999): inside it, an
# outgoing connection (the apiserver's to etcd, once) can hold the port first and the bind fails.
ETCD_PORT = int(os.environ.get("KUBENOVA_ETCD_PORT", "22379"))
APISERVER_PORT = int(os.environ.get("KUBENOVA_APISERVER_PORT", "26443"))
SERVICE_CIDR = "10.96.0.0/24"
ISSUER = "https://kubernetes.default.svc.cluster.local"
#: Cluster mode's apiserver and kubelet address: the test ground's own bridge (see libvirt_host), never
#: 0.0.0.0.
CLUSTER_ADDRESS = "10.99.0.1"


def _go_build(script_name: str, what: str, *args: str) -> pathlib.Path:
    script = REPO / "hack" / script_name
    if not script.exists():
        raise TestGroundError(f"{script} is missing: the test ground needs a source checkout of kubenova")
    proc = subprocess.run(["bash", str(script), *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise TestGroundError(
            f"the Go build of {what} failed (output above); "
            "check that Go >= 1.26 is installed and the Go module proxy is reachable"
        )
    return pathlib.Path(proc.stdout.strip().splitlines()[-1])


def build_tools() -> pathlib.Path:
    """The folder with kube-apiserver, kubectl and etcd, built once and cached by go.sum."""
    return _go_build("build-tools.sh", "kube-apiserver/kubectl/etcd")


def build_node_tools() -> pathlib.Path:
    """The folder with kubelet, kube-scheduler, kube-controller-manager and kube-proxy (cluster mode)."""
    return _go_build("build-tools.sh", "kubelet/kube-scheduler/kube-controller-manager/kube-proxy", "node")


def build_storage_tools() -> pathlib.Path:
    """The folder with local-path-provisioner (cluster mode's storage class)."""
    return _go_build("build-tools.sh", "local-path-provisioner", "storage")


def build_helm() -> pathlib.Path:
    """The helm binary, built once and cached by its go.sum (only the chart tests need it)."""
    return _go_build("build-helm.sh", "helm") / "helm"


def _openssl(*args: str) -> None:
    procs.run(
        ["openssl", *args], "creating test ground certificates", "install openssl (apt-get install openssl)"
    )


def issue_cert(pki: pathlib.Path, name: str, subject: str, sans: str | None = None) -> None:
    """A key and a certificate signed by the test ground's CA (a server's when ``sans`` is given)."""
    if (pki / f"{name}.crt").exists():
        return
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        subject,
        "-keyout",
        str(pki / f"{name}.key"),
        "-out",
        str(pki / f"{name}.csr"),
    )
    extra = []
    if sans:
        (pki / f"{name}.ext").write_text(f"subjectAltName={sans}\n")
        extra = ["-extfile", str(pki / f"{name}.ext")]
    _openssl(
        "x509",
        "-req",
        "-days",
        "3650",
        "-in",
        str(pki / f"{name}.csr"),
        "-CA",
        str(pki / "ca.crt"),
        "-CAkey",
        str(pki / "ca.key"),
        "-CAcreateserial",
        "-out",
        str(pki / f"{name}.crt"),
        *extra,
    )


def ensure_pki(layout: Layout) -> pathlib.Path:
    """A CA, the apiserver's serving cert, an admin client cert and the service-account key."""
    pki = layout.state / "pki"
    if (pki / "sa.key").exists():
        return pki
    pki.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        "/CN=kubenova-dev-ca",
        "-keyout",
        str(pki / "ca.key"),
        "-out",
        str(pki / "ca.crt"),
    )
    # CLUSTER_ADDRESS: where cluster mode serves, so pods reach the apiserver through the kubernetes Service.
    issue_cert(
        pki,
        "apiserver",
        "/CN=kube-apiserver",
        f"IP:127.0.0.1,IP:{CLUSTER_ADDRESS},IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc",
    )
    issue_cert(pki, "admin", "/O=system:masters/CN=kubenova-admin")
    _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
    return pki


def kubeconfig(path: pathlib.Path, pki: pathlib.Path, user: str, host: str = "127.0.0.1") -> pathlib.Path:
    """A kubeconfig that authenticates with the client certificate ``pki/<user>.crt``."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "kubenova-dev",
        "clusters": [
            {
                "name": "kubenova-dev",
                "cluster": {
                    "server": f"https://{host}:{APISERVER_PORT}",
                    "certificate-authority": str(pki / "ca.crt"),
                },
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate": str(pki / f"{user}.crt"),
                    "client-key": str(pki / f"{user}.key"),
                },
            }
        ],
        "contexts": [{"name": "kubenova-dev", "context": {"cluster": "kubenova-dev", "user": user}}],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _get(pki: pathlib.Path, host: str, path: str) -> bool:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    try:
        with urllib.request.urlopen(f"https://{host}:{APISERVER_PORT}{path}", context=ctx, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_etcd(layout: Layout, tools: pathlib.Path) -> None:
    if procs.running_pid(layout, "etcd"):
        return
    procs.check_port_free(ETCD_PORT, "etcd", "KUBENOVA_ETCD_PORT")
    procs.check_port_free(ETCD_PORT + 1, "etcd peers", "KUBENOVA_ETCD_PORT")
    data = layout.state / "etcd"
    client = f"http://127.0.0.1:{ETCD_PORT}"
    peer = f"http://127.0.0.1:{ETCD_PORT + 1}"
    procs.start(
        layout,
        "etcd",
        [
            str(tools / "etcd"),
            "--name=kubenova-dev",
            f"--data-dir={data}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=kubenova-dev={peer}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ],
        marker=f"--data-dir={data}",
    )

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{client}/health", timeout=1) as resp:
                return b'"true"' in resp.read()
        except (urllib.error.URLError, OSError):
            return False

    procs.wait_for(healthy, 30, "etcd", layout.logfile("etcd"))


def start_apiserver(layout: Layout, tools: pathlib.Path, pki: pathlib.Path, cluster: bool = False) -> None:
    """The apiserver on loopback; in cluster mode on CLUSTER_ADDRESS, with what kubelets and pods need."""
    host = CLUSTER_ADDRESS if cluster else "127.0.0.1"
    if cluster:  # ServiceAccount tokens for pods, the Node authorizer, and logs/exec through the kubelet
        mode = [
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={pki / 'admin.crt'}",
            f"--kubelet-client-key={pki / 'admin.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
        ]
    else:  # envtest's way: no pods, so no tokens to mount
        mode = ["--authorization-mode=RBAC", "--disable-admission-plugins=ServiceAccount"]
    if not procs.running_pid(layout, "kube-apiserver"):
        procs.check_port_free(APISERVER_PORT, "kube-apiserver", "KUBENOVA_APISERVER_PORT")
        procs.start(
            layout,
            "kube-apiserver",
            [
                str(tools / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{ETCD_PORT}",
                f"--bind-address={host}",
                f"--advertise-address={host}",
                f"--secure-port={APISERVER_PORT}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                *access.front_proxy_flags(layout),  # aggregated APIs: the access server's users
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                *mode,
                f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={pki / 'sa.key'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=0",
            ],
            marker=f"--cert-dir={pki}",
        )
    procs.wait_for(
        lambda: _get(pki, host, "/readyz") and _get(pki, host, "/api/v1/namespaces/default"),
        90,
        "kube-apiserver",
        layout.logfile("kube-apiserver"),
    )
