"""The stream: bytes through the server to the node's agent and back, and one ending for both sides."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp

from tests.unit.access_harness import (
    FakeAgent,
    FakeCluster,
    Served,
    access_server,
    auth_config,
    fake_agent,
    instance,
    stream,
    stream_path,
)
from tests.unit.access_pki import Pki, pki  # noqa: F401 (the fixture)

Scenario = Callable[[Served, FakeAgent], Coroutine[Any, Any, None]]


def _run(pki: Pki, scenario: Scenario, idle_timeout: float = 60.0) -> None:  # noqa: F811
    async def main() -> None:
        cluster = FakeCluster(auth_config(pki), instances={("team-a", "web"): instance("web", uid="u-1")})
        for sub in ("console", "vnc", "portforward"):
            cluster.allowed.add(("alice", "team-a", sub))
        async with fake_agent(pki, pki.node0) as agent, access_server(pki, cluster, idle_timeout) as served:
            cluster.endpoints["node-0"] = agent.endpoint
            await scenario(served, agent)

    asyncio.run(asyncio.wait_for(main(), 30))


async def _frames(ws: aiohttp.ClientWebSocketResponse) -> AsyncIterator[aiohttp.WSMessage]:
    while True:
        yield await asyncio.wait_for(ws.receive(), 10)


def test_bytes_go_to_the_agent_and_back_over_mutual_tls(pki: Pki) -> None:  # noqa: F811
    async def scenario(served: Served, agent: FakeAgent) -> None:
        async with stream(served, stream_path("web", "portforward") + "?port=22&evil=1") as ws:
            for chunk in (b"SSH-2.0-test\r\n", bytes(range(256)) * 64):
                await ws.send_bytes(chunk)
                got = b""
                while len(got) < len(chunk):
                    msg = await asyncio.wait_for(ws.receive(), 10)
                    assert msg.type is aiohttp.WSMsgType.BINARY
                    got += msg.data
                assert got == chunk
            await ws.close()
            assert ws.close_code == 1000
        assert agent.streams == [("/v1/instances/u-1/portforward", {"port": "22"}, "kubenova-access")]
        assert await asyncio.wait_for(agent.endings.get(), 10) == 1000

    _run(pki, scenario)


def test_the_agents_close_code_and_reason_reach_the_client(pki: Pki) -> None:  # noqa: F811
    async def scenario(served: Served, agent: FakeAgent) -> None:
        agent.close_with = (4001, "console taken over by a newer one")
        async with stream(served, stream_path("web", "console")) as ws:
            await ws.send_bytes(b"x")
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert (msg.type, msg.data, msg.extra) == (
                aiohttp.WSMsgType.CLOSE,
                4001,
                "console taken over by a newer one",
            )

    _run(pki, scenario)


def test_the_clients_close_code_reaches_the_agent(pki: Pki) -> None:  # noqa: F811
    async def scenario(served: Served, agent: FakeAgent) -> None:
        async with stream(served, stream_path("web", "vnc")) as ws:
            await ws.send_bytes(b"RFB 003.008\n")
            assert (await asyncio.wait_for(ws.receive(), 10)).data == b"RFB 003.008\n"
            await ws.close(code=4005, message=b"viewer closed")
        assert await asyncio.wait_for(agent.endings.get(), 10) == 4005

    _run(pki, scenario)


def test_an_idle_stream_is_closed_on_both_sides_with_4000(pki: Pki) -> None:  # noqa: F811
    async def scenario(served: Served, agent: FakeAgent) -> None:
        async with stream(served, stream_path("web", "console")) as ws:
            await ws.send_bytes(b"a")
            await asyncio.wait_for(ws.receive(), 10)
            started = asyncio.get_running_loop().time()
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 4000)
            assert "idle" in msg.extra
            assert asyncio.get_running_loop().time() - started >= 0.3
        assert await asyncio.wait_for(agent.endings.get(), 10) == 4000

    _run(pki, scenario, idle_timeout=0.6)


def test_a_client_that_drops_closes_the_upstream_at_once(pki: Pki) -> None:  # noqa: F811
    async def scenario(served: Served, agent: FakeAgent) -> None:
        async with stream(served, stream_path("web", "console")) as ws:
            await ws.send_bytes(b"a")
            await asyncio.wait_for(ws.receive(), 10)
            transport = ws._response.connection.transport  # type: ignore[union-attr]
            assert transport is not None
            transport.abort()  # no close frame, no FIN handshake: the laptop's lid shut
            assert await asyncio.wait_for(agent.endings.get(), 5) == 1000

    _run(pki, scenario)


def test_an_agent_that_vanishes_ends_the_client_with_1011(pki: Pki) -> None:  # noqa: F811
    async def scenario(served: Served, agent: FakeAgent) -> None:
        agent.vanish = True
        async with stream(served, stream_path("web", "console")) as ws:
            await ws.send_bytes(b"a")
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1011)

    _run(pki, scenario)
