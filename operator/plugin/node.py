"""The verbs of `kubectl kubenova` that run on the instance's node: `vnc` forwards a loopback port to the
guest's VNC server (which listens on that node's loopback only), `console` reads the serial console log
(a file on that node). They stay behind `vnc --on-node` and `console --instances-dir` for a node's shell
whose user may not use the subresources that `access` goes through."""

from __future__ import annotations

import base64
import pathlib
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable

import kubernetes

from kubenova.plugin.verbs import Plugin, Refused


def vnc(plugin: Plugin, name: str, port: int, ready: Callable[[str], None]) -> None:
    """Forward a local port to the guest's VNC server and say the password; runs until interrupted.

    The VNC server listens on the loopback of the instance's node, so this runs on that node
    (or through an SSH tunnel to it), as `console` does; nothing listens on other interfaces.
    """
    body = plugin.get(name)
    vnc = (body.get("status") or {}).get("vnc") or {}
    if not ((body.get("spec") or {}).get("vnc") or {}).get("enabled"):
        raise Refused(f"{name} has no VNC server: create it with spec.vnc.enabled true")
    if not vnc.get("port"):
        raise Refused(f"{name} has no VNC endpoint yet (is it running?)")
    core = kubernetes.client.CoreV1Api(plugin.custom.api_client)
    secret_name = vnc["passwordSecretRef"]["name"]
    try:
        secret = core.read_namespaced_secret(secret_name, plugin.namespace)
    except kubernetes.client.ApiException as exc:
        raise Refused(f"cannot read the Secret {secret_name} with the VNC password: {exc.reason}") from exc
    password = base64.b64decode((secret.data or {}).get("password", "")).decode()
    server = socketserver.ThreadingTCPServer(("127.0.0.1", port), _forwarder(vnc["host"], vnc["port"]))
    server.daemon_threads = True
    ready(f"vnc://127.0.0.1:{server.server_address[1]} password {password} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    finally:
        server.server_close()


def console(plugin: Plugin, name: str, instances_dir: pathlib.Path, follow: bool) -> None:
    """Print the serial console log; it is a file on the instance's node, so this runs there."""
    status = plugin.get(name).get("status") or {}
    log = (status.get("console") or {}).get("logFile")
    if not log:
        raise Refused(f"{name} has no console yet")
    path = instances_dir / log
    if not path.is_file():
        raise Refused(f"{path} is not here: run this on node {status.get('node')} or pass --instances-dir")
    with path.open(errors="replace") as handle:
        while True:
            chunk = handle.read()
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
            elif not follow:
                return
            else:
                time.sleep(0.5)


def _forwarder(host: str, port: int) -> type[socketserver.BaseRequestHandler]:
    class Forward(socketserver.BaseRequestHandler):
        """One VNC client: bytes both ways until either side closes."""

        def handle(self) -> None:
            with socket.create_connection((host, port), timeout=10) as upstream:
                upstream.settimeout(None)
                pump = threading.Thread(target=_copy, args=(upstream, self.request), daemon=True)
                pump.start()
                _copy(self.request, upstream)
                pump.join()

    return Forward


def _copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
