"""The agent's access server settings: where it listens, its certificates, whom it serves, and its flags.

The access server hands a guest's console, VNC and TCP ports to one client only: the access API server,
which authorizes each user with the apiserver first. So the agent needs no Kubernetes credentials of the
user: mutual TLS (a client certificate of the access CA, with the access server's name) is the whole of
its authentication, and it serves only instances bound to its node.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import ssl

#: The certificate subject's common name of the one client the access server serves.
CLIENT_NAME = "kubenova-access"
DEFAULT_ADDRESS = "0.0.0.0:9465"
#: Seconds without a byte either way before a session is closed (close code 4000).
IDLE_TIMEOUT = 600.0


@dataclasses.dataclass(frozen=True)
class AccessSettings:
    """``address`` is host:port ("" serves nothing); ``advertise`` the host the access API server reaches
    this node on ("": the agent's host address)."""

    address: str = DEFAULT_ADDRESS
    cert: str = ""
    key: str = ""
    client_ca: str = ""
    client_name: str = CLIENT_NAME
    advertise: str = ""
    idle_timeout: float = IDLE_TIMEOUT

    @property
    def enabled(self) -> bool:
        """Served only with an address and all three certificate files: never without TLS, and an agent
        deployed before the chart had the certificates keeps running, serving no access."""
        return bool(self.address and self.cert and self.key and self.client_ca)

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]") or "0.0.0.0"

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def endpoint(self, host_ip: str) -> str:
        """host:port as the ComputeNode publishes it (an IPv6 host in brackets)."""
        host = self.advertise or host_ip
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        """TLS 1.2 or newer; a client must present a certificate the access CA signed (refused at the
        handshake otherwise); its name is checked per request (access_server.client_name)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.client_ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(self.cert, self.key)
        return context


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The agent's --access-* flags (cli.py's agent command)."""
    parser.add_argument(
        "--access-address",
        default=_env("KUBENOVA_ACCESS_ADDRESS", DEFAULT_ADDRESS),
        help="host:port of the access server (consoles, VNC, port-forwards for the access API server, "
        "mTLS); empty: none. Served only with --access-cert, --access-key and --access-client-ca "
        f"[$KUBENOVA_ACCESS_ADDRESS, {DEFAULT_ADDRESS}]",
    )
    parser.add_argument(
        "--access-cert",
        default=_env("KUBENOVA_ACCESS_CERT", ""),
        help="its server certificate, whose DNS name is the node's name [$KUBENOVA_ACCESS_CERT]",
    )
    parser.add_argument(
        "--access-key", default=_env("KUBENOVA_ACCESS_KEY", ""), help="its key [$KUBENOVA_ACCESS_KEY]"
    )
    parser.add_argument(
        "--access-client-ca",
        default=_env("KUBENOVA_ACCESS_CLIENT_CA", ""),
        help="the CA whose client certificates it accepts [$KUBENOVA_ACCESS_CLIENT_CA]",
    )
    parser.add_argument(
        "--access-client-name",
        default=_env("KUBENOVA_ACCESS_CLIENT_NAME", CLIENT_NAME),
        help=f"the common name a client certificate must have [{CLIENT_NAME}]",
    )
    parser.add_argument(
        "--access-advertise",
        default=_env("KUBENOVA_ACCESS_ADVERTISE", ""),
        help="the host published as the ComputeNode's status.access.endpoint [the node's host address]",
    )
    parser.add_argument(
        "--access-idle-timeout",
        type=float,
        default=IDLE_TIMEOUT,
        help=f"seconds without a byte either way before a session is closed [{IDLE_TIMEOUT:g}]",
    )


def from_args(args: argparse.Namespace) -> AccessSettings:
    return AccessSettings(
        address=args.access_address,
        cert=args.access_cert,
        key=args.access_key,
        client_ca=args.access_client_ca,
        client_name=args.access_client_name,
        advertise=args.access_advertise,
        idle_timeout=args.access_idle_timeout,
    )
