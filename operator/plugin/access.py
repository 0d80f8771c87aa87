"""The verbs of `kubectl kubenova` that reach into a VM through the kube-apiserver: console, vnc,
port-forward, ssh. They need only a kubeconfig whose user may use the subresources
(`virtualinstances/console`, `/vnc`, `/portforward`), never a shell on the node.

Every local TCP connection (a VNC viewer, an ssh client, anything on a forwarded port) gets its own
WebSocket, as the server end carries one stream per connection; a refused connection is one line on
stderr and the forward goes on serving the next one, as `kubectl port-forward` does.
"""

from __future__ import annotations

import base64
import contextlib
import re
import shlex
import shutil
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, BinaryIO, TextIO

import kubernetes

from kubenova.plugin import stream, terminal
from kubenova.plugin.verbs import Plugin, Refused

HINT = "Connected to {name}'s serial console; escape with Ctrl-]"
#: The viewers `vnc` launches when one is installed, and how each names the forwarded address.
VIEWERS = (("remote-viewer", "vnc://{host}:{port}"), ("vncviewer", "{host}::{port}"))
PORT_SPEC = re.compile(r"(?:(\d*):)?(\d+)")
LOOPBACK = "127.0.0.1"


def ended(name: str, closed: stream.Closed) -> None:
    """Nothing for a normal end; otherwise the close code in words, as a refusal (exit 1)."""
    said = {
        stream.IDLE: "the session was idle too long and the server ended it",
        stream.TAKEN_OVER: f"another console took over {name}'s serial console",
        stream.GONE: f"{name} stopped or went away",
        stream.NODE_ERROR: f"the node could not serve {name}: {closed.reason or 'no reason given'}",
        stream.DROPPED: "the connection to the apiserver dropped",
    }
    if closed.code in (stream.NORMAL, stream.NO_CODE):
        return
    raise Refused(said.get(closed.code, f"the server ended the stream with {closed.code} {closed.reason}"))


def console(
    endpoint: stream.Endpoint, log: bool, follow: bool, stdin: IO[Any], stdout: BinaryIO, stderr: TextIO
) -> None:
    """The serial console: with ``log`` the persistent boot log (then, with ``follow``, the live console);
    else interactive, stdin to the guest and its output to stdout, until Ctrl-] or the server's end."""
    write = _writer(stdout)
    if log:
        ws = endpoint.open("console", {"log": "true"})
        try:
            closed = stream.downstream(ws, write)
        finally:
            ws.shutdown()
        ended(endpoint.name, closed)
        if not follow:
            return
    ws = endpoint.open("console")
    print(HINT.format(name=endpoint.name), file=stderr, flush=True)
    with terminal.raw(stdin.fileno()) as is_terminal:
        result = terminal.session(ws, stdin.fileno(), write)
    if is_terminal:
        print(file=stderr)  # raw mode left the cursor wherever the guest put it
    if result is not None:
        ended(endpoint.name, result)


def _writer(out: BinaryIO) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    return write


class Forwarder(socketserver.ThreadingTCPServer):
    """A loopback listener whose every connection is relayed over its own WebSocket to one subresource."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        local: int,
        endpoint: stream.Endpoint,
        subresource: str,
        query: dict[str, str] | None,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.endpoint, self.subresource, self.query, self.announce = endpoint, subresource, query, announce
        super().__init__((LOOPBACK, local), _Connection)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Connection(socketserver.BaseRequestHandler):
    server: Forwarder

    def handle(self) -> None:
        server = self.server
        if server.announce:
            server.announce(f"Handling connection for {server.port}")
        try:
            ws = server.endpoint.open(server.subresource, server.query)
            ended(server.endpoint.name, stream.relay(self.request, ws))
        except Refused as exc:  # this connection only: the forward serves the next one
            print(f"{exc.prefix}{exc}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def serving(servers: Sequence[Forwarder]) -> Iterator[None]:
    """The listeners accept in their own threads for the block; closed when it ends, however."""
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def listen(
    local: int,
    endpoint: stream.Endpoint,
    subresource: str,
    query: dict[str, str] | None,
    announce: Callable[[str], None] | None = None,
) -> Forwarder:
    """A Forwarder on ``local`` (0: any free port), or a refusal naming the port that is taken."""
    try:
        return Forwarder(local, endpoint, subresource, query, announce)
    except OSError as exc:
        raise Refused(f"cannot listen on {LOOPBACK}:{local}: {exc.strerror or exc}") from exc


def parse_ports(specs: Sequence[str]) -> list[tuple[int, int]]:
    """(local, remote) pairs from `LOCAL:REMOTE`, `REMOTE` (the same local port) or `:REMOTE` (local 0:
    any free port), refused before anything listens."""
    pairs = []
    for spec in specs:
        match = PORT_SPEC.fullmatch(spec)
        if not match:
            raise Refused(f"{spec!r} is no port mapping: use LOCAL:REMOTE, REMOTE or :REMOTE (e.g. 2222:22)")
        local_text, remote_text = match.groups()
        remote = int(remote_text)
        local = remote if local_text is None else int(local_text or 0)
        if not 1 <= remote <= 65535 or not 0 <= local <= 65535:
            raise Refused(f"{spec!r}: ports are numbers from 1 to 65535 (a local 0 or none: any free port)")
        pairs.append((local, remote))
    if not pairs:
        raise Refused("port-forward needs at least one port mapping, e.g. 2222:22")
    return pairs


def port_forward(
    endpoint: stream.Endpoint,
    specs: Sequence[str],
    say: Callable[[str], None],
    stop: threading.Event | None = None,
) -> None:
    """Forward each LOCAL to the guest's REMOTE port until interrupted (or ``stop`` is set)."""
    servers: list[Forwarder] = []
    try:
        for local, remote in parse_ports(specs):
            servers.append(listen(local, endpoint, "portforward", {"port": str(remote)}, say))
            say(f"Forwarding from {LOOPBACK}:{servers[-1].port} -> {remote}")
    except Refused:
        for server in servers:
            server.server_close()
        raise
    with serving(servers):
        (stop or threading.Event()).wait()


def ssh(
    endpoint: stream.Endpoint,
    user: str | None,
    port: int,
    extra: Sequence[str],
    command: str | None,
) -> int:
    """ssh into the guest through a port-forward to a free local port; returns ssh's exit status.

    HostKeyAlias keys the host key to NAME.NAMESPACE, not to 127.0.0.1 and a port that changes each time,
    so known_hosts keeps one entry per VM and still notices when it changes."""
    binary = shutil.which("ssh")
    if binary is None:
        raise Refused("ssh is not installed (use port-forward NAME :22 with your own client)")
    server = listen(0, endpoint, "portforward", {"port": str(port)})
    argv = [binary, "-p", str(server.port), "-o", f"HostKeyAlias={endpoint.name}.{endpoint.namespace}"]
    argv += [*extra, f"{user}@{LOOPBACK}" if user else LOOPBACK, *([command] if command else [])]
    with serving([server]):
        return subprocess.call(argv)


def viewer_command(viewer: str | None, no_viewer: bool, port: int) -> list[str] | None:
    """The viewer to launch on the forwarded address: --viewer's command ({host}, {port}, {url} filled
    in, else the vnc:// URL appended), or the first installed of VIEWERS; None with --no-viewer or none."""
    if no_viewer:
        return None
    fill = {"host": LOOPBACK, "port": str(port), "url": f"vnc://{LOOPBACK}:{port}"}
    if viewer:
        words = shlex.split(viewer)
        if any("{" in word for word in words):
            return [word.format(**fill) for word in words]
        return [*words, fill["url"]]
    for name, address in VIEWERS:
        if path := shutil.which(name):
            return [path, address.format(**fill)]
    return None


def vnc_password(plugin: Plugin, name: str) -> str | None:
    """The VNC password from the instance's Secret when this user may read it (else None: the viewer
    asks); refuses only an instance that exists and has no VNC server, before anything listens."""
    try:
        body = plugin.get(name)
    except (Refused, kubernetes.client.ApiException):
        return None  # the vnc subresource answers with the reason, as it authorizes the user
    if not ((body.get("spec") or {}).get("vnc") or {}).get("enabled"):
        raise Refused(f"{name} has no VNC server: create it with spec.vnc.enabled true")
    ref = ((body.get("status") or {}).get("vnc") or {}).get("passwordSecretRef") or {}
    try:
        secret = plugin.core.read_namespaced_secret(ref["name"], plugin.namespace)
        return base64.b64decode((secret.data or {})["password"]).decode()
    except (KeyError, ValueError, kubernetes.client.ApiException):
        return None


def vnc(
    endpoint: stream.Endpoint,
    local: int,
    command: Callable[[int], list[str] | None],
    password: str | None,
    say: Callable[[str], None],
    stop: threading.Event | None = None,
) -> None:
    """Listen on ``local``, say the address, and run the viewer ``command`` gives for the port (the
    forward ends with it), or serve until interrupted when there is none."""
    server = listen(local, endpoint, "vnc", None)
    address = f"vnc://{LOOPBACK}:{server.port}"
    say(address + (f" password {password}" if password else "") + " (Ctrl-C to stop)")
    argv = command(server.port)
    with serving([server]):
        if argv is None:
            (stop or threading.Event()).wait()
            return
        try:
            subprocess.call(argv)
        except OSError as exc:
            raise Refused(f"cannot run the viewer {argv[0]}: {exc.strerror or exc}") from exc
