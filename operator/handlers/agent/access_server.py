"""The agent's access server: a guest's serial console, VNC and TCP ports, for the access API server only.

Over mutual TLS (access_settings.py), as WebSockets carrying raw bytes both ways:

- ``GET /v1/instances/{uid}/console``: the serial console, interactive; one per instance, a newer one
  takes over (the older closes with 4001: a user whose laptop dropped the connection gets back in at
  once, where refusing would lock them out until the dead session idled away); ``?log=true`` sends the
  console log and closes (1000), for a stopped instance too.
- ``GET /v1/instances/{uid}/vnc``: the guest's VNC server (the client answers its password challenge).
- ``GET /v1/instances/{uid}/portforward?port=N``: TCP to the guest's first leased address.

Only instances bound to this node (the agent's instance cache) are served (404 otherwise); one whose
domain does not run gets 409. Sessions close with 1000 at a normal end, 4000 when idle, 4001 when taken
over, 4002 when the instance stopped or went away, 1011 on a node-side error.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from kubenova.driver.base import (
    ComputeDriver,
    DriverError,
    InstanceNotFound,
    InstanceNotRunning,
    PowerState,
    Unsupported,
)
from kubenova.handlers.agent.access_relay import (
    CHUNK,
    INSTANCE_GONE,
    NODE_ERROR,
    NORMAL,
    TAKEN_OVER,
    Session,
    relay,
)
from kubenova.handlers.agent.access_settings import AccessSettings
from kubenova.handlers.agent.cache import ObjectCache
from kubenova.handlers.agent.leases import macs_of

log = logging.getLogger(__name__)
#: Seconds between WebSocket pings: a client that vanished without a close is noticed within two.
HEARTBEAT = 30.0
#: Seconds to open the node's end (a socket, a TCP connection to the guest).
CONNECT_TIMEOUT = 10.0
RUNNING = (PowerState.RUNNING, PowerState.PAUSED)


def client_name(request: web.Request) -> str | None:
    """The common name of the client certificate the TLS handshake verified; None without one."""
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def guest_address(body: Mapping[str, Any], leases: Mapping[str, str]) -> str | None:
    """The address the node's DHCP leased the instance (its status's first interface that has one, else a
    lease of one of its MACs read now). Never what the guest agent claims (status.ipAddresses may hold
    such claims when no lease is known): a guest that claimed 127.0.0.1 would have the agent forward to
    the node's own services. The same rule as Services' endpoints (docs/security.md)."""
    for interface in (body.get("status") or {}).get("interfaces") or []:
        if interface.get("ipAddress"):
            return str(interface["ipAddress"])
    return next((leases[mac] for mac in macs_of(body) if mac in leases), None)


class AccessServer:
    """The routes, the running sessions by instance, and the aiohttp runner inside the agent's loop."""

    def __init__(self, settings: AccessSettings, driver: ComputeDriver, instances: ObjectCache) -> None:
        self.settings, self.driver, self.instances = settings, driver, instances
        self.sessions: dict[str, set[Session]] = {}
        #: the interactive console of each instance
        self.consoles: dict[str, Session] = {}
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._only_the_access_server])
        app.router.add_get("/v1/instances/{uid}/console", self.console)
        app.router.add_get("/v1/instances/{uid}/vnc", self.vnc)
        app.router.add_get("/v1/instances/{uid}/portforward", self.portforward)
        return app

    async def start(self) -> int:
        """Listen (TLS) and follow the instances' going and stopping; returns the port (for port 0)."""
        self._loop = asyncio.get_running_loop()
        self.instances.on_forget(self._threadsafe_gone)
        self.driver.add_lifecycle_listener(self._threadsafe_changed)
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.settings.host, self.settings.port, ssl_context=self.settings.ssl_context()
        )
        await site.start()
        port = int(self._runner.addresses[0][1])
        log.info("access server listening on %s:%d", self.settings.host, port)
        return port

    async def stop(self) -> None:
        for sessions in list(self.sessions.values()):
            for session in sessions:
                session.stop(NODE_ERROR, "the agent is stopping")
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _only_the_access_server(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The handshake proved the client's CA; its name says it is the access server, not another
        holder of that CA's certificates."""
        if client_name(request) != self.settings.client_name:
            raise web.HTTPForbidden(text="only the access API server's certificate is served here\n")
        response: web.StreamResponse = await handler(request)
        return response

    # --- the routes ---------------------------------------------------------------------------------

    async def console(self, request: web.Request) -> web.StreamResponse:
        uid = self._bound(request)
        if request.query.get("log") == "true":
            return await self._log(request, uid)
        console = await self._driver_call(self.driver.get_serial_console, uid)
        return await self._serve(request, uid, "console", console.socket, None, self._console_taken)

    async def vnc(self, request: web.Request) -> web.StreamResponse:
        uid = self._bound(request)
        vnc = await self._driver_call(self.driver.get_vnc_console, uid)
        return await self._serve(request, uid, "vnc", vnc.host, vnc.port)

    async def portforward(self, request: web.Request) -> web.StreamResponse:
        uid = self._bound(request)
        try:
            port = int(request.query.get("port", ""))
        except ValueError:
            port = 0
        if not 1 <= port <= 65535:
            raise web.HTTPBadRequest(text="port must be a number from 1 to 65535\n")
        await self._driver_call(self.driver.get_info, uid)  # running, else 409
        try:
            leases = await asyncio.to_thread(self.driver.dhcp_leases)
        except DriverError:
            leases = {}
        address = guest_address(self.instances.objects.get(uid) or {}, leases)
        if address is None:
            raise web.HTTPConflict(text="the instance has no address yet\n")
        return await self._serve(request, uid, "portforward", address, port)

    # --- helpers ------------------------------------------------------------------------------------

    def _bound(self, request: web.Request) -> str:
        uid = request.match_info["uid"]
        if uid not in self.instances.objects:
            raise web.HTTPNotFound(text=f"no instance {uid} is bound to this node\n")
        return uid

    async def _driver_call(self, call: Any, uid: str) -> Any:
        """``call(uid)`` in a thread, for a running instance: 409 when it does not run (its domain not made
        yet or gone meanwhile included: it is bound here) or lacks what was asked for (a VNC server)."""
        try:
            info = await asyncio.to_thread(self.driver.get_info, uid)
            if info.state not in RUNNING:
                raise web.HTTPConflict(text=f"the instance is not running ({info.state.value})\n")
            return await asyncio.to_thread(call, uid)
        except InstanceNotFound:
            raise web.HTTPConflict(text="the instance is not running (it has no domain here)\n") from None
        except DriverError as exc:  # not running meanwhile, or Unsupported (no VNC server)
            raise web.HTTPConflict(text=f"{exc}\n") from None

    async def _log(self, request: web.Request, uid: str) -> web.StreamResponse:
        """The console log, for a stopped instance too: as binary frames, then a normal close."""
        try:
            data = await asyncio.to_thread(self._log_bytes, uid)
        except (DriverError, OSError) as exc:  # no domain yet (InstanceNotFound) included
            raise web.HTTPConflict(text=f"cannot read the console log: {exc}\n") from None
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT)
        await ws.prepare(request)
        for start in range(0, len(data), CHUNK):
            await ws.send_bytes(data[start : start + CHUNK])
        await ws.close(code=NORMAL, message=b"the end of the console log")
        return ws

    def _log_bytes(self, uid: str) -> bytes:
        """The log file as it is (virtlogd bounds it), or the driver's reading of it when the guest does not
        run (no console to ask where it is)."""
        try:
            return pathlib.Path(self.driver.get_serial_console(uid).log).read_bytes()
        except (InstanceNotRunning, Unsupported):
            return self.driver.get_console_output(uid).encode()

    def _console_taken(self, uid: str, session: Session) -> None:
        old = self.consoles.get(uid)
        if old is not None:
            old.stop(TAKEN_OVER, "a newer console took over")
        self.consoles[uid] = session

    async def _serve(
        self,
        request: web.Request,
        uid: str,
        kind: str,
        host: str,
        port: int | None,
        claim: Any = None,
    ) -> web.StreamResponse:
        """Upgrade, then open the node's end and relay; a node's end that cannot be opened closes with 1011
        and the reason (the access API server passes it on as the proxy it is)."""
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT)
        await ws.prepare(request)
        session = Session(uid, kind)
        if claim is not None:
            claim(uid, session)
        self.sessions.setdefault(uid, set()).add(session)
        try:
            try:
                if port is None:
                    opened = asyncio.open_unix_connection(host)
                else:
                    opened = asyncio.open_connection(host, port)
                reader, writer = await asyncio.wait_for(opened, CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                reason = f"cannot reach the instance's {kind}: {exc}"
                await ws.close(code=NODE_ERROR, message=reason.encode()[:123])
                return ws
            at_end = (
                (INSTANCE_GONE, "the instance stopped")
                if kind == "console"
                else (NORMAL, f"the instance's {kind} closed the connection")
            )
            await relay(ws, reader, writer, session, self.settings.idle_timeout, at_end)
        finally:
            self.sessions.get(uid, set()).discard(session)
            if not self.sessions.get(uid):
                self.sessions.pop(uid, None)
            if self.consoles.get(uid) is session:
                del self.consoles[uid]
        return ws

    # --- instances that go or stop ------------------------------------------------------------------

    def _threadsafe_gone(self, uid: str) -> None:
        if self._loop is not None and uid in self.sessions:
            self._loop.call_soon_threadsafe(self._end_all, uid, "the instance left this node")

    def _threadsafe_changed(self, uid: str, *_: Any) -> None:
        if self._loop is not None and uid in self.sessions:
            asyncio.run_coroutine_threadsafe(self._check_running(uid), self._loop)

    async def _check_running(self, uid: str) -> None:
        try:
            running = (await asyncio.to_thread(self.driver.get_info, uid)).state in RUNNING
        except InstanceNotFound:
            running = False
        except DriverError:
            return  # libvirt away: the sessions' own streams say when the guest is gone
        if not running:
            self._end_all(uid, "the instance stopped")

    def _end_all(self, uid: str, reason: str) -> None:
        for session in list(self.sessions.get(uid, ())):
            session.stop(INSTANCE_GONE, reason)
