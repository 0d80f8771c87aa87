"""The node end: a WebSocket to the agent of the instance's node, over mutual TLS.

The server presents its client certificate (CN ``kubenova-access``), which the agents require, and checks
the agent's certificate against the agents' CA *for the node's name* (the agent's certificate carries it
as a DNS name), not for the address: an endpoint comes from a ComputeNode's status, which that node's
agent writes, so a node that published another node's address, or its own address under another
node's name, is refused here before a byte of the stream goes to it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping

import aiohttp
from aiohttp.client_middlewares import ClientHandlerType
from yarl import URL

from kubenova.handlers.access.status import Refusal

#: Seconds to reach the agent and finish the WebSocket handshake.
CONNECT_TIMEOUT = 15.0
#: Seconds between pings on an open stream: a peer that vanished without a FIN is noticed.
HEARTBEAT = 30.0


class AgentRefused(Exception):
    """The agent answered the handshake with an HTTP error instead of a stream."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


async def _read_refusal(request: aiohttp.ClientRequest, handler: ClientHandlerType) -> aiohttp.ClientResponse:
    """aiohttp's ws_connect drops a refused handshake's body; read it first, to tell the user the agent's
    own words."""
    response = await handler(request)
    if response.status != 101:
        text = (await response.read()).decode(errors="replace")[:1000]
        try:
            found = json.loads(text)
            message = str(found.get("message") or text) if isinstance(found, dict) else text
        except ValueError:
            message = text
        response.release()
        raise AgentRefused(response.status, message.strip() or response.reason or "")
    return response


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """TLS to the agents: their CA only, hostname checked (against the node's name), our certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.load_cert_chain(cert, key)
    return context


def agent_url(endpoint: str, uid: str, subresource: str, query: Mapping[str, str]) -> URL:
    """``wss://host:port/v1/instances/<uid>/<subresource>?...``; a 503 for an endpoint that is not one."""
    host, sep, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Refusal(503, f"the node publishes an access endpoint that is no host:port: {endpoint!r}")
    return URL.build(
        scheme="wss", host=host, port=int(port), path=f"/v1/instances/{uid}/{subresource}", query=dict(query)
    )


class Agents:
    """Opens streams to agents; one client session (and its connection pool) for the server's life."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            middlewares=(_read_refusal,),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
        )

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def connect(
        self, node: str, endpoint: str, uid: str, subresource: str, query: Mapping[str, str]
    ) -> aiohttp.ClientWebSocketResponse:
        """The agent's stream; a 503 when it cannot be reached (or is not ``node``), a 502 when it refuses."""
        assert self.session is not None, "Agents.start() first"
        url = agent_url(endpoint, uid, subresource, query)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                return await self.session.ws_connect(
                    url,
                    ssl=self.context,
                    server_hostname=node,
                    autoclose=False,
                    autoping=True,
                    heartbeat=HEARTBEAT,
                )
        except AgentRefused as exc:
            raise Refusal(502, f'the agent of node "{node}" refused the {subresource}: {exc}') from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            raise Refusal(503, f'the agent of node "{node}" at {endpoint} cannot be reached: {why}') from exc
