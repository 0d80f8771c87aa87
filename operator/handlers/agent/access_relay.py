"""One access session: bytes between a WebSocket and a stream (a console socket, VNC, a guest's TCP port).

The relay is four small tasks raced against each other: the client's frames to the stream, the stream's
bytes to the client, an idle clock, and a stop the server may ask for (a newer console took over, the
instance stopped). Whichever ends first ends the session, and the stream is closed at once: a dropped
WebSocket leaves nothing open on the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

#: WebSocket close codes (RFC 6455's, and ours in the private 4000-4999 range).
NORMAL, NODE_ERROR = 1000, 1011
IDLE, TAKEN_OVER, INSTANCE_GONE = 4000, 4001, 4002
#: Bytes read from the stream at a time (one frame each).
CHUNK = 65536

#: (close code, reason) a session ends with; None: the client went.
Ending = tuple[int, str] | None


@dataclasses.dataclass
class Clock:
    """When a byte last went either way."""

    last: float


class Session:
    """A relay the server can end from outside (``stop``), with the code the client then sees."""

    def __init__(self, uid: str, kind: str) -> None:
        self.uid, self.kind = uid, kind
        self.stopped: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    def stop(self, code: int, reason: str) -> None:
        if not self.stopped.done():
            self.stopped.set_result((code, reason))


async def _client_to_stream(ws: web.WebSocketResponse, writer: asyncio.StreamWriter, clock: Clock) -> Ending:
    """Frames to the stream until the client closes (or drops: aiohttp then ends the iteration too)."""
    loop = asyncio.get_running_loop()
    async for message in ws:
        if message.type is WSMsgType.BINARY:
            data = message.data
        elif message.type is WSMsgType.TEXT:  # the protocol says binary; a text frame's bytes are meant
            data = message.data.encode()
        else:
            break
        writer.write(data)
        await writer.drain()
        clock.last = loop.time()
    return None


async def _stream_to_client(
    reader: asyncio.StreamReader, ws: web.WebSocketResponse, clock: Clock, at_end: tuple[int, str]
) -> Ending:
    loop = asyncio.get_running_loop()
    while data := await reader.read(CHUNK):
        await ws.send_bytes(data)
        clock.last = loop.time()
    return at_end


async def _idle(clock: Clock, timeout: float) -> Ending:
    loop = asyncio.get_running_loop()
    while (left := clock.last + timeout - loop.time()) > 0:
        await asyncio.sleep(left)
    return IDLE, f"no bytes either way for {timeout:g} s"


async def _stopped(session: Session) -> Ending:
    return await session.stopped


def _outcome(task: asyncio.Task[Ending]) -> Ending:
    try:
        return task.result()
    except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
        return NODE_ERROR, f"the node's end of the connection failed: {exc}"[:120]


async def relay(
    ws: web.WebSocketResponse,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    session: Session,
    idle_timeout: float,
    at_end: tuple[int, str],
) -> Ending:
    """Pump both ways until one side ends, the session idles or is stopped; ``at_end`` is how the session
    ends when the stream closes. The stream is closed before this returns, and the WebSocket with the
    ending's code (the client's own close needs no answer beyond aiohttp's)."""
    clock = Clock(asyncio.get_running_loop().time())
    tasks = [
        asyncio.create_task(_client_to_stream(ws, writer, clock)),
        asyncio.create_task(_stream_to_client(reader, ws, clock, at_end)),
        asyncio.create_task(_idle(clock, idle_timeout)),
        asyncio.create_task(_stopped(session)),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        ending = _outcome(next(task for task in tasks if task in done))
    finally:
        for task in tasks:
            task.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    if ending is not None and not ws.closed:
        code, reason = ending
        await ws.close(code=code, message=reason.encode()[:123])
    log.debug("%s session of %s ended: %s", session.kind, session.uid, ending or "the client went")
    return ending
