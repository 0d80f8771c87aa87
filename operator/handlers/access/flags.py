"""The flags of ``kubenova access``; cli.py only hands its subparsers here."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``access`` to the ``kubenova`` command's subcommands."""
    access = sub.add_parser(
        "access",
        help="run the aggregated API server for console, VNC and port-forward "
        "(subresources.compute.kubenova.io)",
    )
    access.add_argument("--address", default="0.0.0.0:8443", help="host:port to serve on [0.0.0.0:8443]")
    access.add_argument(
        "--tls-cert", required=True, help="the serving certificate (PEM) the APIService's CA signed"
    )
    access.add_argument("--tls-key", required=True, help="its key")
    access.add_argument(
        "--agent-client-cert",
        required=True,
        help="the client certificate (CN kubenova-access) the agents require",
    )
    access.add_argument("--agent-client-key", required=True, help="its key")
    access.add_argument(
        "--agent-ca", required=True, help="the CA of the agents' serving certificates (each names its node)"
    )
    access.add_argument(
        "--idle-timeout",
        type=float,
        default=1800.0,
        help="seconds with no byte either way after which a stream is closed (code 4000) [1800]",
    )
    access.add_argument(
        "--auth-refresh",
        type=float,
        default=60.0,
        help="seconds between reads of kube-system/extension-apiserver-authentication [60]",
    )
    return access


def host_port(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as a listener's host and port."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address: expected host:port, not {address!r}")
    return host.strip("[]"), int(port)
