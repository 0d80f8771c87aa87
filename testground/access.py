"""The test ground's part of the access API (docs/access.md): the kube-apiserver's front proxy, and the
certificates, Secrets and chart values of the access server and of the agents' stream ends, made as an
admin would make them (with cert-manager, say), all signed by the test ground's own CA (testground.pki).

The front proxy's CA is that CA, not the apiserver's client CA: a user's client certificate must never be
able to name another user in headers.
"""

from __future__ import annotations

import base64
import pathlib
from typing import Any

import yaml

from kubenova.handlers.shared import LEASE_NAMESPACE
from testground import pki
from testground.procs import Layout

#: The common name of the kube-apiserver's proxy client certificate, the only one the access server trusts.
FRONT_PROXY_CLIENT = "front-proxy-client"
#: The common name the agents require of the access server's client certificate.
ACCESS_CLIENT = "kubenova-access"
#: The Secrets the chart's values name (access.tls, access.agentClientTLS, agent.access).
SERVING_SECRET = "kubenova-access-tls"
CLIENT_SECRET = "kubenova-access-client-tls"
AGENT_SECRET = "kubenova-agent-access-tls"
#: The name the kube-apiserver checks the access server's certificate for (its Service's).
SERVICE_NAME = f"kubenova-access.{LEASE_NAMESPACE}.svc"


def _folder(layout: Layout) -> pathlib.Path:
    return layout.state / "access"


def front_proxy_flags(layout: Layout) -> list[str]:
    """The kube-apiserver's front-proxy flags: who may name users in headers, and its own client certificate
    for the aggregated APIs it proxies to."""
    cert = pki.server_certificate(layout, FRONT_PROXY_CLIENT, "127.0.0.1", _folder(layout) / "front-proxy")
    return [
        f"--requestheader-client-ca-file={cert.ca}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={cert.cert}",
        f"--proxy-client-key-file={cert.key}",
    ]


def _secret(name: str, cert: pki.ServerCertificate) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": LEASE_NAMESPACE},
        "stringData": {
            "tls.crt": cert.cert.read_text(),
            "tls.key": cert.key.read_text(),
            "ca.crt": cert.ca.read_text(),
        },
    }


def secrets(layout: Layout, node: str, node_ip: str) -> list[dict[str, Any]]:
    """The access server's serving and client certificates and the node's agent serving certificate (its
    DNS name is the node's, which the access server checks)."""
    folder = _folder(layout)
    made = {
        SERVING_SECRET: pki.server_certificate(layout, SERVICE_NAME, "127.0.0.1", folder / "serving"),
        CLIENT_SECRET: pki.server_certificate(layout, ACCESS_CLIENT, "127.0.0.1", folder / "client"),
        AGENT_SECRET: pki.server_certificate(layout, node, node_ip, folder / f"agent-{node}"),
    }
    return [_secret(name, cert) for name, cert in made.items()]


def values(layout: Layout) -> dict[str, Any]:
    """The chart's values that turn the access server and the agents' stream ends on."""
    ca = pki.server_certificate(layout, SERVICE_NAME, "127.0.0.1", _folder(layout) / "serving").ca
    return {
        "access": {
            "enabled": True,
            "tls": {"secretName": SERVING_SECRET},
            "agentClientTLS": {"secretName": CLIENT_SECRET},
            "caBundle": base64.b64encode(ca.read_bytes()).decode(),
        },
        "agent": {"access": {"secretName": AGENT_SECRET}},
    }


def manifest(layout: Layout, node: str, node_ip: str) -> str:
    """The Secrets as one YAML stream for `kubectl apply -f -`."""
    return yaml.safe_dump_all(secrets(layout, node, node_ip))
