"""The agent's access server: port-forward and VNC to local TCP echo servers, and who it refuses."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from kubenova.driver.base import VncConsole
from kubenova.driver.fake import FakeDriver
from kubenova.handlers.agent.access_server import guest_address
from kubenova.handlers.agent.access_settings import AccessSettings
from kubenova.handlers.agent.node_reporter import NodeReporter
from kubenova.handlers.shared import COMPUTENODES
from tests.unit.agent_access_harness import (
    INITRD,
    KERNEL,
    EchoServer,
    Served,
    on_node,
    receive_bytes,
    receive_until_closed,
    serving,
    spawn,
    until_no_sessions,
)
from tests.unit.agent_access_pki import AccessPKI, make
from tests.unit.reconcile_fakes import FakeApiserver, MemoryStatusWriter

#: The 'guest' is this host: its leased address, as status.interfaces says, is loopback.
LOOPBACK = [{"name": "default", "macAddress": "52:54:00:00:00:01", "ipAddress": "127.0.0.1"}]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> AccessPKI:
    return make(tmp_path_factory.mktemp("access-pki"))


def test_a_port_forward_reaches_the_guests_tcp_service_both_ways(pki: AccessPKI) -> None:
    async def scenario() -> None:
        echo = await EchoServer().start()
        async with serving(pki) as served:
            uid = spawn(served.driver, served.cache, interfaces=LOOPBACK)
            async with served.connect(uid, f"portforward?port={echo.port}") as ws:
                payload = bytes(range(256)) * 1024  # binary, several frames' worth
                await ws.send_bytes(payload)
                assert await receive_bytes(ws, payload) == payload
        echo.close()

    asyncio.run(scenario())


def test_a_dropped_websocket_closes_the_guest_connection_at_once(pki: AccessPKI) -> None:
    async def scenario() -> None:
        echo = await EchoServer().start()
        async with serving(pki) as served:
            uid = spawn(served.driver, served.cache, interfaces=LOOPBACK)
            async with served.connect(uid, f"portforward?port={echo.port}") as ws:
                await ws.send_bytes(b"ping")
                await receive_bytes(ws, b"ping")
                transport = ws._response.connection.transport  # noqa: SLF001 (a drop: no close frame)
                assert transport is not None
                transport.abort()
                async with asyncio.timeout(5):
                    await echo.closed.wait()
            await until_no_sessions(served.server)
        echo.close()

    asyncio.run(scenario())


def test_when_the_guest_closes_its_port_the_forward_ends_normally(pki: AccessPKI) -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with serving(pki) as served:
            uid = spawn(served.driver, served.cache, interfaces=LOOPBACK)
            async with served.connect(uid, f"portforward?port={port}") as ws:
                await receive_until_closed(ws)
            assert ws.close_code == 1000
        server.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("port", ["0", "65536", "ssh", ""])
def test_a_port_outside_1_to_65535_is_400(pki: AccessPKI, port: str) -> None:
    async def scenario() -> None:
        async with serving(pki) as served:
            uid = spawn(served.driver, served.cache, interfaces=LOOPBACK)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with served.connect(uid, f"portforward?port={port}"):
                    pass
            assert refused.value.status == 400

    asyncio.run(scenario())


def test_an_instance_without_an_address_yet_is_409(pki: AccessPKI) -> None:
    async def scenario(served: Served, uid: str) -> None:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with served.connect(uid, "portforward?port=22"):
                pass
        assert refused.value.status == 409

    on_node(pki, scenario)


def test_a_refused_guest_port_closes_with_1011_and_the_reason(pki: AccessPKI) -> None:
    async def scenario() -> None:
        echo = await EchoServer().start()
        port = echo.port
        echo.close()  # nothing listens there any more
        await asyncio.sleep(0)
        async with serving(pki) as served:
            uid = spawn(served.driver, served.cache, interfaces=LOOPBACK)
            async with served.connect(uid, f"portforward?port={port}") as ws:
                message = await ws.receive()
            assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1011)
            assert "cannot reach the instance's portforward" in message.extra

    asyncio.run(scenario())


def test_the_guest_address_is_a_leased_one_never_a_guest_agents_claim() -> None:
    body = {
        "metadata": {"uid": "u1"},
        "spec": {"interfaces": [{"name": "a", "macAddress": "52:54:00:AA:00:01"}]},
    }
    leased = [{"name": "a", "macAddress": "52:54:00:aa:00:01", "ipAddress": "10.222.0.5"}]
    assert guest_address({**body, "status": {"interfaces": leased, "ipAddresses": ["10.222.0.5"]}}, {}) == (
        "10.222.0.5"
    )
    assert guest_address(body, {"52:54:00:aa:00:01": "10.222.0.9"}) == "10.222.0.9"
    claimed = {
        **body,
        "status": {"interfaces": [leased[0] | {"ipAddress": None}], "ipAddresses": ["127.0.0.1"]},
    }
    assert guest_address(claimed, {}) is None


class VncDriver(FakeDriver):
    """The fake's VNC endpoint moved to a real server the test runs."""

    vnc_port = 0

    def get_vnc_console(self, uuid: str) -> VncConsole:
        found = super().get_vnc_console(uuid)
        return VncConsole("127.0.0.1", self.vnc_port, found.password)


def test_vnc_is_relayed_to_the_instances_vnc_server(pki: AccessPKI) -> None:
    async def scenario() -> None:
        echo = await EchoServer().start()
        driver = VncDriver("vnc-host", images={KERNEL: b"kernel", INITRD: b"initrd"})
        driver.vnc_port = echo.port
        async with serving(pki, driver) as served:
            uid = spawn(served.driver, served.cache)
            async with served.connect(uid, "vnc") as ws:
                await ws.send_bytes(b"RFB 003.008\n")
                assert await receive_bytes(ws, b"RFB 003.008\n") == b"RFB 003.008\n"
        echo.close()

    asyncio.run(scenario())


# --- who is refused -------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", [None, "other-ca"])
def test_a_client_without_a_certificate_of_the_access_ca_is_refused_at_the_handshake(
    pki: AccessPKI, client: str | None
) -> None:
    async def scenario(served: Served, uid: str) -> None:
        with pytest.raises(aiohttp.ClientError):
            async with served.connect(uid, "console", client=client) as ws:
                await ws.receive()  # TLS 1.3: the server's refusal arrives after the client's handshake
        assert not served.server.sessions

    on_node(pki, scenario)


def test_a_certificate_of_the_access_ca_with_another_name_is_403(pki: AccessPKI) -> None:
    async def scenario(served: Served, uid: str) -> None:
        for what in ("console", "console?log=true", "vnc", "portforward?port=22"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with served.connect(uid, what, client="other-name"):
                    pass
            assert refused.value.status == 403
        assert not served.server.sessions

    on_node(pki, scenario)


def test_the_access_server_is_off_without_its_certificates_and_publishes_its_endpoint() -> None:
    assert not AccessSettings().enabled
    assert not AccessSettings(address="", cert="c", key="k", client_ca="ca").enabled
    on = AccessSettings(cert="c", key="k", client_ca="ca")
    assert on.enabled and on.endpoint("10.0.0.4") == "10.0.0.4:9465"
    assert AccessSettings(advertise="node-a.example").endpoint("10.0.0.4") == "node-a.example:9465"
    assert AccessSettings(address="[::]:9000").endpoint("fd00::4") == "[fd00::4]:9000"


def test_the_node_publishes_where_its_access_server_is_reached_and_withdraws_it_when_off() -> None:
    api = FakeApiserver()
    api.add(COMPUTENODES, {"metadata": {"name": "node-a"}, "spec": {}})
    status = {}
    for endpoint in ("10.0.0.4:9465", ""):
        reporter = NodeReporter(
            "node-a", FakeDriver("node-a"), api, None, "10.0.0.4", set, lambda *_: None,  # type: ignore[arg-type]
            access_endpoint=endpoint,
        )  # fmt: skip
        reporter.writer = MemoryStatusWriter(api, COMPUTENODES)  # type: ignore[assignment]
        reporter.status = dict(status)
        reporter.report()
        status = api.objects[(COMPUTENODES, None, "node-a")]["status"]
        assert status.get("access") == ({"endpoint": endpoint} if endpoint else None)


def test_a_guest_claiming_the_nodes_loopback_gets_no_forward_there(pki: AccessPKI) -> None:
    async def scenario() -> None:
        echo = await EchoServer().start()  # a node-local service the guest would like to reach
        async with serving(pki) as served:
            uid = spawn(served.driver, served.cache, ipAddresses=["127.0.0.1"])  # its agent's claim only
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with served.connect(uid, f"portforward?port={echo.port}"):
                    pass
            assert refused.value.status == 409 and echo.connections == 0
        echo.close()

    asyncio.run(scenario())
