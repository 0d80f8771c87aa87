"""Real certificates for the access server's tests, made with the openssl command line as the test ground
makes its own (testground/pki.py): EC keys, so a whole set takes a fraction of a second."""

from __future__ import annotations

import dataclasses
import pathlib
import ssl
import subprocess

import pytest


@dataclasses.dataclass(frozen=True)
class Pair:
    cert: str
    key: str

    def pem(self) -> str:
        return pathlib.Path(self.cert).read_text()


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"openssl {args[0]}: {proc.stderr}"


def make_ca(folder: pathlib.Path, name: str) -> Pair:
    folder.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30", "-subj", f"/CN={name}", cwd=folder,
    )  # fmt: skip
    return Pair(str(folder / f"{name}.pem"), str(folder / f"{name}.key"))


def issue(ca: Pair, folder: pathlib.Path, name: str, cn: str, sans: str = "") -> Pair:
    """A certificate ``name`` with subject CN ``cn`` (and ``sans``, e.g. "DNS:node-0, IP:127.0.0.1")."""
    ext = folder / f"{name}.cnf"
    ext.write_text(
        (f"subjectAltName = {sans}\n" if sans else "") + "extendedKeyUsage = serverAuth, clientAuth\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "30", "-extfile", ext.name, cwd=folder,
    )  # fmt: skip
    return Pair(str(folder / f"{name}.pem"), str(folder / f"{name}.key"))


@dataclasses.dataclass(frozen=True)
class Pki:
    """Everything a test plays with: the kube-apiserver's front proxy, an attacker's look-alikes, the
    access server's serving certificate, the agents' CA with two nodes' certificates and the access
    server's client certificate for them."""

    front_proxy_ca: Pair
    front_proxy: Pair  # CN front-proxy-client, what the kube-apiserver presents
    front_proxy_other_cn: Pair  # the right CA, a CN not in the allowed names
    rogue_ca: Pair
    rogue_front_proxy: Pair  # CN front-proxy-client, signed by another CA
    serving_ca: Pair
    serving: Pair  # the access server's, for 127.0.0.1
    agent_ca: Pair
    node0: Pair  # the agent of node-0, at 127.0.0.1
    node1: Pair  # the agent of node-1, also at 127.0.0.1
    access_client: Pair  # CN kubenova-access

    def client_context(self, cert: Pair | None = None) -> ssl.SSLContext:
        """A client of the access server that trusts its serving CA and presents ``cert``."""
        context = ssl.create_default_context(cafile=self.serving_ca.cert)
        if cert is not None:
            context.load_cert_chain(cert.cert, cert.key)
        return context


def make_pki(folder: pathlib.Path) -> Pki:
    front_ca, rogue_ca = make_ca(folder, "front-proxy-ca"), make_ca(folder, "rogue-ca")
    serving_ca, agent_ca = make_ca(folder, "serving-ca"), make_ca(folder, "agent-ca")
    return Pki(
        front_proxy_ca=front_ca,
        front_proxy=issue(front_ca, folder, "front-proxy", "front-proxy-client"),
        front_proxy_other_cn=issue(front_ca, folder, "front-proxy-other", "someone-else"),
        rogue_ca=rogue_ca,
        rogue_front_proxy=issue(rogue_ca, folder, "rogue", "front-proxy-client"),
        serving_ca=serving_ca,
        serving=issue(serving_ca, folder, "serving", "kubenova-access", "DNS:localhost, IP:127.0.0.1"),
        agent_ca=agent_ca,
        node0=issue(agent_ca, folder, "node-0", "node-0", "DNS:node-0, IP:127.0.0.1"),
        node1=issue(agent_ca, folder, "node-1", "node-1", "DNS:node-1, IP:127.0.0.1"),
        access_client=issue(agent_ca, folder, "access-client", "kubenova-access"),
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("access-pki"))
