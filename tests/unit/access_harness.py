"""The access server on a real localhost port with real TLS, an in-memory apiserver, and a fake agent (a
real WSS server with a node's certificate that requires the access server's client certificate)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from kubenova.handlers.access.frontproxy import AuthConfig, FrontProxy, User
from kubenova.handlers.access.kube import Decision
from kubenova.handlers.access.server import create_app
from kubenova.handlers.access.upstream import Agents, client_context
from kubenova.handlers.shared import NODE_LABEL
from tests.unit.access_pki import Pair, Pki

GROUP_PATH = "/apis/subresources.compute.kubenova.io/v1alpha1"
#: The headers the kube-apiserver's front proxy sends by default.
PROXY_HEADERS = {"X-Remote-User": "alice", "X-Remote-Group": "team-a"}


def auth_config(pki: Pki, allowed: tuple[str, ...] = ("front-proxy-client",)) -> AuthConfig:
    return AuthConfig(
        client_ca=pki.front_proxy_ca.pem(),
        allowed_names=allowed,
        username_headers=("X-Remote-User",),
        group_headers=("X-Remote-Group",),
        extra_prefixes=("X-Remote-Extra-",),
    )


def instance(name: str, node: str = "node-0", phase: str = "Running", uid: str = "") -> dict[str, Any]:
    labels = {NODE_LABEL: node} if node else {}
    return {
        "metadata": {"name": name, "uid": uid or f"uid-{name}", "labels": labels},
        "status": {"phase": phase},
    }


@dataclasses.dataclass
class FakeCluster:
    """The apiserver as the server sees it; records what it was asked."""

    config: AuthConfig
    instances: dict[tuple[str, str], dict[str, Any]] = dataclasses.field(default_factory=dict)
    endpoints: dict[str, str] = dataclasses.field(default_factory=dict)
    #: (user, namespace, subresource) allowed; anything else is denied.
    allowed: set[tuple[str, str, str]] = dataclasses.field(default_factory=set)
    reviews: list[tuple[User, dict[str, str]]] = dataclasses.field(default_factory=list)
    lookups: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    async def instance(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        self.lookups.append((namespace, name))
        return self.instances.get((namespace, name))

    async def endpoint(self, node: str) -> str | None:
        return self.endpoints.get(node)

    async def review(self, user: User, attributes: Mapping[str, str]) -> Decision:
        self.reviews.append((user, dict(attributes)))
        key = (user.name, attributes["namespace"], attributes["subresource"])
        return Decision(True) if key in self.allowed else Decision(False, "")

    async def auth_config(self) -> AuthConfig:
        return self.config


@dataclasses.dataclass
class Served:
    url: str
    front_proxy: FrontProxy
    pki: Pki

    def session(self, cert: Pair | None = None) -> aiohttp.ClientSession:
        """A client of the server that presents ``cert`` (the kube-apiserver presents pki.front_proxy)."""
        connector = aiohttp.TCPConnector(ssl=self.pki.client_context(cert), force_close=True)
        return aiohttp.ClientSession(connector=connector)


@contextlib.asynccontextmanager
async def access_server(pki: Pki, cluster: FakeCluster, idle_timeout: float = 60.0) -> AsyncIterator[Served]:
    front_proxy = FrontProxy(pki.serving.cert, pki.serving.key, cluster.auth_config)
    await front_proxy.refresh()
    agents = Agents(client_context(pki.access_client.cert, pki.access_client.key, pki.agent_ca.cert))
    runner = web.AppRunner(create_app(cluster, front_proxy, agents, idle_timeout), shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=front_proxy.ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Served(f"https://127.0.0.1:{port}", front_proxy, pki)
    finally:
        await runner.cleanup()


@dataclasses.dataclass
class FakeAgent:
    """A node's agent: echoes bytes, or does what a test sets; records each stream and how it ended."""

    endpoint: str = ""
    #: (path, query, the client certificate's CN) of each stream
    streams: list[tuple[str, dict[str, str], str]] = dataclasses.field(default_factory=list)
    #: the close code the access server sent, per stream (None: the connection just dropped)
    endings: asyncio.Queue[int | None] = dataclasses.field(default_factory=asyncio.Queue)
    refuse: tuple[int, str] | None = None
    #: after the first frame, close with this (code, reason) instead of echoing
    close_with: tuple[int, str] | None = None
    #: after the first frame, drop the connection without a close frame
    vanish: bool = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        cn = next((v for rdn in (peercert or {}).get("subject", ()) for k, v in rdn if k == "commonName"), "")
        self.streams.append((request.path, dict(request.query), cn))
        if self.refuse:
            status, message = self.refuse
            return web.json_response({"kind": "Status", "message": message}, status=status)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        ending: int | None = None
        while (msg := await ws.receive()).type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
            if self.vanish and request.transport:
                request.transport.abort()
                break
            if self.close_with:
                await ws.close(code=self.close_with[0], message=self.close_with[1].encode())
                break
            await ws.send_bytes(msg.data if msg.type is aiohttp.WSMsgType.BINARY else msg.data.encode())
        else:
            # The code in the close frame the access server sent; ws.close_code may say 1006 when the
            # server closed its end right after sending it, as it does.
            ending = int(msg.data) if msg.type is aiohttp.WSMsgType.CLOSE else None
        self.endings.put_nowait(ending)
        return ws


@contextlib.asynccontextmanager
async def fake_agent(pki: Pki, cert: Pair) -> AsyncIterator[FakeAgent]:
    agent = FakeAgent()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(pki.agent_ca.cert)
    app = web.Application()
    app.router.add_get("/v1/instances/{uid}/{subresource}", agent.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    agent.endpoint = f"127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield agent
    finally:
        await runner.cleanup()


#: What a WebSocket handshake sends; a plain GET with these reads the Status body of a refused one.
UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def stream_path(name: str = "web", subresource: str = "console", namespace: str = "team-a") -> str:
    return f"{GROUP_PATH}/namespaces/{namespace}/virtualinstances/{name}/{subresource}"


async def refused(served: Served, path: str, headers: Mapping[str, str] = PROXY_HEADERS) -> tuple[int, Any]:
    """Ask for a stream as the front proxy; the status and Status body of the refusal."""
    async with served.session(served.pki.front_proxy) as http:
        async with http.get(served.url + path, headers={**UPGRADE, **headers}) as answer:
            assert answer.status != 101, "expected a refusal, got a stream"
            return answer.status, await answer.json()


@contextlib.asynccontextmanager
async def stream(served: Served, path: str) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A stream as the user gets it through the kube-apiserver's front proxy."""
    async with served.session(served.pki.front_proxy) as http:
        async with http.ws_connect(served.url + path, headers=PROXY_HEADERS, autoclose=False) as ws:
            yield ws
