"""etcd and kube-apiserver run the way envtest runs them: no kubelet, no scheduler."""
from __future__ import annotations

import os
import pathlib
import ssl
import subprocess
import urllib.error
import urllib.request

import yaml

from kubenova.testground import procs
from kubenova.testground.procs import Layout, TestGroundError

REPO = pathlib.Path(__file__).resolve().parents[2]
# Every port the test ground listens on is below Linux's ephemeral range (32768-60999): inside it, an
# outgoing connection (the apiserver's to etcd, once) can hold the port first and the bind fails.
ETCD_PORT = int(os.environ.get("KUBENOVA_ETCD_PORT", "22379"))
APISERVER_PORT = int(os.environ.get("KUBENOVA_APISERVER_PORT", "26443"))
SERVICE_CIDR = "10.96.0.0/24"
ISSUER = "https://kubernetes.default.svc.cluster.local"


def _go_build(script_name: str, what: str) -> pathlib.Path:
    script = REPO / "hack" / script_name
    if not script.exists():
        raise TestGroundError(f"{script} is missing: the test ground needs a source checkout of kubenova")
    proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise TestGroundError(f"the Go build of {what} failed (output above); "
                              "check that Go >= 1.26 is installed and the Go module proxy is reachable")
    return pathlib.Path(proc.stdout.strip().splitlines()[-1])


def build_tools() -> pathlib.Path:
    """The folder with kube-apiserver, kubectl and etcd, built once and cached by go.sum."""
    return _go_build("build-tools.sh", "kube-apiserver/kubectl/etcd")


def build_helm() -> pathlib.Path:
    """The helm binary, built once and cached by its go.sum (only the chart tests need it)."""
    return _go_build("build-helm.sh", "helm") / "helm"


def _openssl(*args: str) -> None:
    procs.run(["openssl", *args], "creating test ground certificates",
              "install openssl (apt-get install openssl)")


def ensure_pki(layout: Layout) -> pathlib.Path:
    """A CA, the apiserver's serving cert, an admin client cert and the service-account key."""
    pki = layout.state / "pki"
    if (pki / "admin.crt").exists():
        return pki
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj", "/CN=kubenova-dev-ca",
             "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"))
    (pki / "serving.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc\n")
    for name, subject, ext in (("apiserver", "/CN=kube-apiserver", "serving.ext"),
                               ("admin", "/O=system:masters/CN=kubenova-admin", None)):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                 "-keyout", str(pki / f"{name}.key"), "-out", str(pki / f"{name}.csr"))
        extra = ["-extfile", str(pki / ext)] if ext else []
        _openssl("x509", "-req", "-days", "3650", "-in", str(pki / f"{name}.csr"), "-CA", str(pki / "ca.crt"),
                 "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-out", str(pki / f"{name}.crt"), *extra)
    _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
    return pki


def write_kubeconfig(layout: Layout, pki: pathlib.Path) -> None:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "kubenova-dev",
        "clusters": [{"name": "kubenova-dev", "cluster": {
            "server": f"https://127.0.0.1:{APISERVER_PORT}", "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": "kubenova-admin", "user": {
            "client-certificate": str(pki / "admin.crt"), "client-key": str(pki / "admin.key")}}],
        "contexts": [{"name": "kubenova-dev", "context": {"cluster": "kubenova-dev", "user": "kubenova-admin"}}],
    }
    layout.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))


def _get(pki: pathlib.Path, path: str) -> bool:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{APISERVER_PORT}{path}", context=ctx, timeout=2) as resp:
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
    procs.start(layout, "etcd", [
        str(tools / "etcd"), "--name=kubenova-dev", f"--data-dir={data}",
        f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=kubenova-dev={peer}", "--unsafe-no-fsync=true", "--log-level=warn",
    ], marker=f"--data-dir={data}")

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{client}/health", timeout=1) as resp:
                return b'"true"' in resp.read()
        except (urllib.error.URLError, OSError):
            return False
    procs.wait_for(healthy, 30, "etcd", layout.logfile("etcd"))


def start_apiserver(layout: Layout, tools: pathlib.Path, pki: pathlib.Path) -> None:
    if not procs.running_pid(layout, "kube-apiserver"):
        procs.check_port_free(APISERVER_PORT, "kube-apiserver", "KUBENOVA_APISERVER_PORT")
        procs.start(layout, "kube-apiserver", [
            str(tools / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{ETCD_PORT}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={APISERVER_PORT}",
            f"--cert-dir={pki}", f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}", f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=RBAC",
            f"--service-account-issuer={ISSUER}", f"--service-account-key-file={pki / 'sa.key'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--disable-admission-plugins=ServiceAccount", "--allow-privileged=true",
            "--profiling=false", "--v=0",
        ], marker=f"--cert-dir={pki}")
    procs.wait_for(lambda: _get(pki, "/readyz") and _get(pki, "/api/v1/namespaces/default"), 90,
                   "kube-apiserver", layout.logfile("kube-apiserver"))
