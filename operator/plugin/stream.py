"""The WebSocket to a VirtualInstance's streaming subresource (console, vnc, portforward), opened through the
kube-apiserver with the kubeconfig's own credentials, and the pumps that move its binary frames.

The apiserver proxies the aggregated group `subresources.compute.kubenova.io` to kubenova, which authorizes
each request by the caller's RBAC (`virtualinstances/console` ...), so a laptop with a kubeconfig reaches
what used to need a shell on the node. The connection is built from the official client's Configuration
(the same server, CA, client certificate, token and proxy as every other verb) so an exec or auth-provider
plugin and `--context` work here as they do for `kubectl`; websocket-client speaks RFC 6455.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

import kubernetes
import websocket

from kubenova.plugin.verbs import Refused

GROUP = "subresources.compute.kubenova.io"
VERSION = "v1alpha1"

#: The close codes the server ends a stream with (1005: the close frame had no code; 1006: no close frame).
NORMAL, NO_CODE, DROPPED, NODE_ERROR = 1000, 1005, 1006, 1011
IDLE, TAKEN_OVER, GONE = 4000, 4001, 4002

#: How long opening the connection (TCP, TLS, the upgrade) may take; the stream itself has no timeout.
CONNECT_TIMEOUT = 30.0
CHUNK = 65536


class ServerSaid(Refused):
    """The apiserver (or kubenova behind it) refused the upgrade: its Status message, as kubectl prints it."""

    prefix = ""


@dataclasses.dataclass(frozen=True)
class Closed:
    """How the server ended a stream: its close code and reason."""

    code: int
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One VirtualInstance's streaming subresources, reached with one kubeconfig's credentials."""

    configuration: kubernetes.client.Configuration
    namespace: str
    name: str

    def url(self, subresource: str, query: dict[str, str] | None = None) -> str:
        base = urllib.parse.urlsplit(self.configuration.host)
        scheme = {"https": "wss", "http": "ws"}.get(base.scheme, base.scheme)
        path = (
            f"{base.path.rstrip('/')}/apis/{GROUP}/{VERSION}/namespaces/{urllib.parse.quote(self.namespace)}"
            f"/virtualinstances/{urllib.parse.quote(self.name)}/{subresource}"
        )
        return urllib.parse.urlunsplit((scheme, base.netloc, path, urllib.parse.urlencode(query or {}), ""))

    def open(self, subresource: str, query: dict[str, str] | None = None) -> websocket.WebSocket:
        """The upgraded connection, or a refusal that says what the apiserver said (never a traceback)."""
        url = self.url(subresource, query)
        try:
            ws = websocket.create_connection(
                url, timeout=CONNECT_TIMEOUT, **connect_options(self.configuration)
            )
        except websocket.WebSocketBadStatusException as exc:
            raise status_refusal(exc.status_code, exc.resp_body, exc.status_message) from exc
        except (OSError, websocket.WebSocketException) as exc:
            raise Refused(f"cannot reach the apiserver at {self.configuration.host}: {exc}") from exc
        ws.settimeout(None)
        return ws


def connect_options(configuration: kubernetes.client.Configuration) -> dict[str, Any]:
    """websocket-client's options for what the kubeconfig says: TLS trust and client certificate, the
    bearer token (refreshed through the client's hook, so exec and auth-provider plugins work), the proxy."""
    options: dict[str, Any] = {"header": [], "enable_multithread": True}
    token = configuration.auth_settings().get("BearerToken", {}).get("value")
    if token:
        options["header"].append(f"Authorization: {token}")
    if urllib.parse.urlsplit(configuration.host).scheme == "https":
        verify = bool(configuration.verify_ssl)
        sslopt: dict[str, Any] = {
            "cert_reqs": ssl.CERT_REQUIRED if verify else ssl.CERT_NONE,
            "check_hostname": verify and configuration.assert_hostname is not False,
        }
        if configuration.ssl_ca_cert:
            sslopt["ca_certs"] = configuration.ssl_ca_cert
        if configuration.cert_file:
            sslopt["certfile"] = configuration.cert_file
        if configuration.key_file:
            sslopt["keyfile"] = configuration.key_file
        if getattr(configuration, "tls_server_name", None):
            sslopt["server_hostname"] = configuration.tls_server_name
        options["sslopt"] = sslopt
    if configuration.proxy:
        proxy = urllib.parse.urlsplit(configuration.proxy)
        options["http_proxy_host"] = proxy.hostname
        options["http_proxy_port"] = proxy.port or (443 if proxy.scheme == "https" else 80)
        options["proxy_type"] = {"socks5h": "socks5h", "socks5": "socks5", "socks4": "socks4"}.get(
            proxy.scheme, "http"
        )
        if proxy.username:
            options["http_proxy_auth"] = (
                urllib.parse.unquote(proxy.username),
                urllib.parse.unquote(proxy.password or ""),
            )
        if getattr(configuration, "no_proxy", None):
            options["http_no_proxy"] = [h.strip() for h in configuration.no_proxy.split(",") if h.strip()]
    return options


def status_refusal(code: int, body: bytes | None, status_message: str | None) -> Refused:
    """A refused upgrade in kubectl's words: `Error from server (Forbidden): <the Status message>`."""
    status: dict[str, Any] = {}
    try:
        status = json.loads(body or b"")
    except ValueError:
        pass
    if not isinstance(status, dict):
        status = {}
    if code == 401:
        return ServerSaid("error: You must be logged in to the server (Unauthorized)")
    message = status.get("message") or (body or b"").decode(errors="replace").strip()
    reason = status.get("reason") or status_message or f"HTTP {code}"
    return ServerSaid(f"Error from server ({reason}): {message or f'the server answered {code}'}")


def downstream(ws: websocket.WebSocket, write: Callable[[bytes], None]) -> Closed:
    """Hand every data frame to ``write`` until the server closes; returns how it closed."""
    try:
        while True:
            opcode, frame = ws.recv_data_frame()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return _closed(frame.data)
            write(frame.data if isinstance(frame.data, bytes) else str(frame.data).encode())
    except (OSError, websocket.WebSocketException):
        return Closed(DROPPED, "the connection dropped")


def _closed(data: bytes) -> Closed:
    if len(data) < 2:
        return Closed(NO_CODE)
    return Closed(int.from_bytes(data[:2], "big"), data[2:].decode(errors="replace"))


def send(ws: websocket.WebSocket, data: bytes) -> bool:
    """One binary frame; False once the connection is gone (the reader then says how it ended)."""
    try:
        ws.send_bytes(data)
        return True
    except (OSError, websocket.WebSocketException):
        return False


def finish(ws: websocket.WebSocket, reader: threading.Thread | None = None, wait: float = 3.0) -> None:
    """Say 1000 (normal end) and give the server's last frames ``wait`` seconds to arrive before dropping
    the connection: bytes it sent before our close still reach the user."""
    try:
        ws.send_close(NORMAL)
    except (OSError, websocket.WebSocketException):
        pass
    if reader is not None:
        reader.join(wait)
    try:
        ws.shutdown()
    except OSError:
        pass


def relay(conn: socket.socket, ws: websocket.WebSocket) -> Closed:
    """Bytes both ways between a local TCP connection and the WebSocket until either side ends."""
    ended: list[Closed] = []
    reader = threading.Thread(target=_down_to_socket, args=(ws, conn, ended), daemon=True)
    reader.start()
    try:
        while chunk := conn.recv(CHUNK):
            if not send(ws, chunk):
                break
    except OSError:
        pass
    finish(ws, reader)
    return ended[0] if ended else Closed(NORMAL)


def _down_to_socket(ws: websocket.WebSocket, conn: socket.socket, ended: list[Closed]) -> None:
    ended.append(downstream(ws, conn.sendall))
    try:  # wakes relay()'s recv: the local client sees the end too
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
