"""A stand-in for the kube-apiserver's path to kubenova's streaming subresources: a real aiohttp WebSocket
server on 127.0.0.1 (plain or TLS) that records each request and runs a test's script on the socket, and a
kubeconfig pointing at it, so the plugin runs as on a laptop: kubeconfig, apiserver URL, upgrade."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import ssl
import subprocess
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import yaml
from aiohttp import WSMsgType, web

Script = Callable[[web.Request, web.WebSocketResponse], Awaitable[None]]
#: The instance "web" of namespace "team", where the tests' subresource requests go.
PATH = "/apis/subresources.compute.kubenova.io/v1alpha1/namespaces/team/virtualinstances/web"


@dataclasses.dataclass
class Seen:
    """One request as the server saw it, and how the client closed (None: it did not)."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    received: bytearray = dataclasses.field(default_factory=bytearray)
    close_code: int | None = None
    #: Set when the server's handler has returned: the client may be done before it.
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)

    def settled(self) -> Seen:
        assert self.finished.wait(5), "the server's handler did not return"
        return self


async def echo(request: web.Request, ws: web.WebSocketResponse) -> None:
    """Every binary frame back, until the client closes."""
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)


class Apiserver:
    """Answers every path with the upgrade and ``script`` (``refuse``: a status and JSON body instead)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.script: Script = echo
        self.refuse: tuple[int, dict[str, Any]] | None = None
        self.seen: list[Seen] = []
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=tls)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(request.path, dict(request.query), dict(request.headers))
        self.seen.append(seen)
        if self.refuse is not None:
            return web.json_response(self.refuse[1], status=self.refuse[0])
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            await self.script(request, _Recording(ws, seen))  # type: ignore[arg-type]
        finally:
            seen.close_code = ws.close_code
            seen.finished.set()
        return ws

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()


class _Recording:
    """The server's WebSocket, keeping what the client sent for the test to read."""

    def __init__(self, ws: web.WebSocketResponse, seen: Seen) -> None:
        self.ws, self.seen = ws, seen

    def __aiter__(self) -> _Recording:
        return self

    async def __anext__(self) -> Any:
        msg = await self.ws.__anext__()
        if msg.type == WSMsgType.BINARY:
            self.seen.received += msg.data
        return msg

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ws, name)


def kubeconfig(folder: pathlib.Path, server: str, token: str, ca: pathlib.Path | None = None) -> str:
    """A kubeconfig whose current context names ``server``, a bearer token and the namespace `team`."""
    cluster: dict[str, Any] = {"server": server}
    if ca is not None:
        cluster["certificate-authority"] = str(ca)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": cluster}],
        "users": [{"name": "someone", "user": {"token": token}}],
        "contexts": [
            {"name": "fake", "context": {"cluster": "fake", "user": "someone", "namespace": "team"}}
        ],
        "current-context": "fake",
    }
    path = folder / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def self_signed(folder: pathlib.Path) -> tuple[pathlib.Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 made with the openssl command line (as testground/pki.py does), and the
    server's TLS context; the certificate is its own CA."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return cert, context
