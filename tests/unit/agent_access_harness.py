"""A real access server (aiohttp, TLS with openssl-made certificates) over the fake driver, and its client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from kubenova.driver.base import InstanceSpec, KernelBoot
from kubenova.driver.fake import FakeDriver
from kubenova.handlers.agent.access_server import AccessServer
from kubenova.handlers.agent.access_settings import AccessSettings
from kubenova.handlers.agent.cache import ObjectCache
from kubenova.handlers.agent.workqueue import WorkQueue
from tests.unit.agent_access_pki import NODE, AccessPKI

KERNEL, INITRD = "vmlinuz", "initrd.img"


def fake_driver() -> FakeDriver:
    return FakeDriver(f"access-{uuidlib.uuid4().hex[:8]}", images={KERNEL: b"kernel", INITRD: b"initrd"})


def spawn(driver: FakeDriver, cache: ObjectCache, **status: Any) -> str:
    """A running instance bound here (in the cache, with ``status``); returns its UID."""
    uid = str(uuidlib.uuid4())
    driver.spawn(
        InstanceSpec(
            uuid=uid,
            name=f"vm-{uid[:8]}",
            namespace="ns",
            vcpus=1,
            memory_mib=128,
            boot=KernelBoot(f"/images/{KERNEL}", f"/images/{INITRD}", "console=ttyS0"),
            vnc_password="s3cret",
        )
    )
    meta = {"uid": uid, "namespace": "ns", "name": f"vm-{uid[:8]}", "resourceVersion": "1"}
    cache.seen("ADDED", {"metadata": meta, "spec": {}, "status": status})
    return uid


@dataclasses.dataclass
class Served:
    server: AccessServer
    driver: FakeDriver
    cache: ObjectCache
    port: int
    pki: AccessPKI

    def url(self, uid: str, what: str) -> str:
        return f"wss://127.0.0.1:{self.port}/v1/instances/{uid}/{what}"

    @contextlib.asynccontextmanager
    async def connect(
        self, uid: str, what: str, client: str | None = "client"
    ) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        """A WebSocket as the access API server opens it (its certificate, the node's name checked)."""
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                self.url(uid, what), ssl=self.pki.client_context(client), server_hostname=NODE
            ) as ws,
        ):
            yield ws


@contextlib.asynccontextmanager
async def serving(
    pki: AccessPKI, driver: FakeDriver | None = None, idle_timeout: float = 30.0
) -> AsyncIterator[Served]:
    cert, key = pki.server
    settings = AccessSettings(
        address="127.0.0.1:0", cert=cert, key=key, client_ca=pki.ca, idle_timeout=idle_timeout
    )
    driver = driver or fake_driver()
    cache = ObjectCache(WorkQueue(1), "instance")
    server = AccessServer(settings, driver, cache)
    port = await server.start()
    try:
        yield Served(server, driver, cache, port, pki)
    finally:
        await server.stop()


def on_node(
    pki: AccessPKI, scenario: Callable[[Served, str], Awaitable[None]], idle_timeout: float = 30.0
) -> None:
    """Run ``scenario`` against a fresh access server, with the UID of one running instance bound here."""

    async def run() -> None:
        async with serving(pki, idle_timeout=idle_timeout) as served:
            await scenario(served, spawn(served.driver, served.cache))

    asyncio.run(run())


async def receive_until_closed(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> bytes:
    """Every binary frame until the server closes; ``ws.close_code`` then says how."""
    got = b""
    async with asyncio.timeout(timeout):
        async for message in ws:
            if message.type is aiohttp.WSMsgType.BINARY:
                got += message.data
    return got


async def receive_bytes(ws: aiohttp.ClientWebSocketResponse, want: bytes, timeout: float = 5.0) -> bytes:
    """Binary frames until ``want`` has arrived in them (a stream may cut it anywhere)."""
    got = b""
    async with asyncio.timeout(timeout):
        while want not in got:
            message = await ws.receive()
            assert message.type is aiohttp.WSMsgType.BINARY, message
            got += message.data
    return got


class EchoServer:
    """A TCP service in the 'guest' (127.0.0.1): echoes, and says when its peer's connection closed."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> EchoServer:
        self._server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
        self.closed.set()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def until_no_sessions(server: AccessServer, timeout: float = 5.0) -> None:
    """The server's handlers finish just after the client saw the close."""
    async with asyncio.timeout(timeout):
        while server.sessions:
            await asyncio.sleep(0.02)
