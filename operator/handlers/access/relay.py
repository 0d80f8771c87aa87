"""The stream itself: bytes both ways between the user's WebSocket and the agent's, and one ending for both.

Each direction is a ``pump``: binary frames copied as they come (console bytes, RFB, TCP; a text frame is
carried as its UTF-8 bytes), nothing buffered beyond the frame in hand. ``relay`` runs both pumps and a
watch on idleness; the first of them to end ends the whole: the other side gets the close code and
reason the ending side sent (4001 console taken over, 4002 instance stopped, ...), a side that vanished
without a close frame ends the other with 1000 (the user left) or 1011 (the node side failed), and
``idle_timeout`` seconds without a byte either way end both with 4000. Nothing stays open on either
side: a console or port-forward left behind on a node would hold a guest's console or a TCP connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Protocol

from aiohttp import WSMsgType
from aiohttp.http_websocket import WSMessage

NORMAL = 1000
NODE_ERROR = 1011
IDLE = 4000
#: Codes RFC 6455 forbids sending (no status, abnormal closure, TLS failure), and what is sent instead.
_UNSENDABLE = (1004, 1005, 1006, 1015)


class Socket(Protocol):
    """What a pump needs of either end: aiohttp's server and client WebSockets both are one."""

    async def receive(self, timeout: float | None = None) -> WSMessage: ...

    async def send_bytes(self, data: bytes, compress: int | None = None) -> None: ...

    async def close(self, *, code: int = NORMAL, message: bytes = b"") -> bool: ...


@dataclasses.dataclass(frozen=True)
class Ending:
    """How one side ended: the close code and reason it sent, or ``vanished`` when it sent none."""

    code: int = NORMAL
    reason: str = ""
    vanished: bool = False


class Activity:
    """When a byte last moved, either way."""

    def __init__(self) -> None:
        self.last = asyncio.get_running_loop().time()

    def touch(self) -> None:
        self.last = asyncio.get_running_loop().time()

    async def expire(self, timeout: float) -> Ending:
        """Return once ``timeout`` seconds pass with no byte moved."""
        loop = asyncio.get_running_loop()
        while (left := self.last + timeout - loop.time()) > 0:
            await asyncio.sleep(left)
        return Ending(IDLE, f"idle for {timeout:g} s")


async def pump(source: Socket, sink: Socket, activity: Activity) -> Ending:
    """Copy frames from ``source`` to ``sink`` until ``source`` ends; say how it ended."""
    while True:
        msg = await source.receive()
        if msg.type is WSMsgType.BINARY:
            activity.touch()
            await sink.send_bytes(msg.data)
        elif msg.type is WSMsgType.TEXT:
            activity.touch()
            await sink.send_bytes(msg.data.encode())
        elif msg.type is WSMsgType.CLOSE:
            return Ending(int(msg.data), str(msg.extra or ""))
        elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return Ending(vanished=True)


def sendable(code: int, fallback: int) -> int:
    return fallback if code in _UNSENDABLE or not 1000 <= code <= 4999 else code


async def close(socket: Socket, code: int, reason: str) -> None:
    """Close ``socket``, whatever state it is in: a peer already gone is no error."""
    with contextlib.suppress(Exception):
        await socket.close(code=code, message=reason.encode()[:123])


async def relay(client: Socket, upstream: Socket, idle_timeout: float) -> Ending:
    """Carry bytes between ``client`` and ``upstream`` until either ends or both idle; close both."""
    activity = Activity()
    up = asyncio.create_task(pump(client, upstream, activity), name="relay-up")
    down = asyncio.create_task(pump(upstream, client, activity), name="relay-down")
    idle = asyncio.create_task(activity.expire(idle_timeout), name="relay-idle")
    tasks = (up, down, idle)
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    first = next(task for task in tasks if task in done)
    if first is idle:
        ending = idle.result()
        await asyncio.gather(close(client, IDLE, ending.reason), close(upstream, IDLE, ending.reason))
        return ending
    try:
        ending, user_ended = first.result(), first is up
    except Exception as exc:  # a send failed: the side written to is the one that is gone
        ending, user_ended = Ending(reason=str(exc), vanished=True), first is down
    if user_ended:  # the user ended the stream, or left
        code = NORMAL if ending.vanished else sendable(ending.code, NORMAL)
        reason = "" if ending.vanished else ending.reason
    else:  # the node ended it: say why, or that it failed
        code = NODE_ERROR if ending.vanished else sendable(ending.code, NORMAL)
        reason = "the node's agent went away" if ending.vanished else ending.reason
    await asyncio.gather(close(client, code, reason), close(upstream, code, reason))
    return ending
