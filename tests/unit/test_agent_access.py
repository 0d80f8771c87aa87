"""The agent's access server, console end: a real aiohttp server over TLS, the fake driver's serial socket."""

from __future__ import annotations

import asyncio
import pathlib

import aiohttp
import pytest

from kubenova.driver.fake import BOOT_MARKER
from tests.unit.agent_access_harness import (
    Served,
    on_node,
    receive_bytes,
    receive_until_closed,
    serving,
    spawn,
    until_no_sessions,
)
from tests.unit.agent_access_pki import AccessPKI, make


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> AccessPKI:
    return make(tmp_path_factory.mktemp("access-pki"))


def test_typed_bytes_come_back_from_the_guests_serial_console(pki: AccessPKI) -> None:
    async def scenario(served: Served, uid: str) -> None:
        async with served.connect(uid, "console") as ws:
            await ws.send_bytes(b"root\r\n")
            assert b"root\r\n" in await receive_bytes(ws, b"root\r\n")

    on_node(pki, scenario)


def test_a_second_console_takes_over_and_the_first_closes_with_4001(pki: AccessPKI) -> None:
    async def scenario(served: Served, uid: str) -> None:
        async with served.connect(uid, "console") as first:
            await first.send_bytes(b"one")
            await receive_bytes(first, b"one")
            async with served.connect(uid, "console") as second:
                await receive_until_closed(first)
                assert first.close_code == 4001
                await second.send_bytes(b"two")
                assert b"two" in await receive_bytes(second, b"two")
                assert len(served.server.sessions[uid]) == 1

    on_node(pki, scenario)


def test_the_console_log_is_sent_whole_then_closed_normally_for_a_stopped_instance_too(
    pki: AccessPKI,
) -> None:
    async def scenario(served: Served, uid: str) -> None:
        async with served.connect(uid, "console?log=true") as ws:
            log = await receive_until_closed(ws)
        assert BOOT_MARKER.encode() in log and ws.close_code == 1000
        served.driver.power_off(uid)
        async with served.connect(uid, "console?log=true") as ws:
            assert BOOT_MARKER.encode() in await receive_until_closed(ws)
        assert ws.close_code == 1000

    on_node(pki, scenario)


def test_what_was_typed_is_in_the_log_afterwards(pki: AccessPKI) -> None:
    async def scenario(served: Served, uid: str) -> None:
        async with served.connect(uid, "console") as ws:
            await ws.send_bytes(b"uname -a\n")
            await receive_bytes(ws, b"uname -a\n")
        async with served.connect(uid, "console?log=true") as ws:
            assert b"uname -a\n" in await receive_until_closed(ws)

    on_node(pki, scenario)


@pytest.mark.parametrize("what", ["console", "console?log=true", "vnc", "portforward?port=22"])
def test_an_instance_not_bound_here_is_404(pki: AccessPKI, what: str) -> None:
    async def scenario() -> None:
        async with serving(pki) as served:
            spawn(served.driver, served.cache)
            unbound = spawn(served.driver, served.cache)
            served.cache.forget({"metadata": {"uid": unbound}})  # its domain is here, but it is not bound
            for uid in ("no-such-instance", unbound):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    async with served.connect(uid, what):
                        pass
                assert refused.value.status == 404

    asyncio.run(scenario())


def test_a_stopped_instance_has_no_console_409(pki: AccessPKI) -> None:
    async def scenario(served: Served, uid: str) -> None:
        served.driver.power_off(uid)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with served.connect(uid, "console"):
                pass
        assert refused.value.status == 409

    on_node(pki, scenario)


def test_an_idle_console_closes_with_4000(pki: AccessPKI) -> None:
    async def scenario(served: Served, uid: str) -> None:
        async with served.connect(uid, "console") as ws:
            await receive_until_closed(ws)
        assert ws.close_code == 4000
        await until_no_sessions(served.server)

    on_node(pki, scenario, idle_timeout=0.3)


@pytest.mark.parametrize("end", ["the guest stops", "the instance leaves this node"])
def test_the_console_closes_with_4002_when_the_instance_stops_or_leaves(pki: AccessPKI, end: str) -> None:
    async def scenario(served: Served, uid: str) -> None:
        async with served.connect(uid, "console") as ws:
            await ws.send_bytes(b"x")
            await receive_bytes(ws, b"x")
            if end == "the guest stops":
                await asyncio.to_thread(served.driver.power_off, uid)
            else:
                await asyncio.to_thread(served.cache.forget, {"metadata": {"uid": uid}})
            await receive_until_closed(ws)
        assert ws.close_code == 4002

    on_node(pki, scenario)


def test_a_closed_websocket_leaves_no_console_connection_on_the_node(pki: AccessPKI) -> None:
    async def scenario(served: Served, uid: str) -> None:
        async with served.connect(uid, "console") as ws:
            await ws.send_bytes(b"x")
            await receive_bytes(ws, b"x")
        await until_no_sessions(served.server)
        assert uid not in served.server.consoles

    on_node(pki, scenario)


def test_the_fake_consoles_socket_path_fits_a_unix_socket(pki: AccessPKI) -> None:
    async def scenario(served: Served, uid: str) -> None:
        console = served.driver.get_serial_console(uid)
        assert len(console.socket.encode()) <= 107 and pathlib.Path(console.socket).is_socket()

    on_node(pki, scenario)


def test_a_bound_instance_whose_domain_is_not_made_yet_is_409(pki: AccessPKI) -> None:
    async def scenario(served: Served, uid: str) -> None:
        served.driver.destroy(uid)
        for what in ("console", "console?log=true", "vnc"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with served.connect(uid, what):
                    pass
            assert refused.value.status == 409

    on_node(pki, scenario)
