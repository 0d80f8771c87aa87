"""The local end of an interactive serial console: the terminal in raw mode (every key, Ctrl-C included,
goes to the guest, as on a real serial line) and an escape key that ends the session locally.

Raw mode is undone on every way out (the escape, the server's close, an exception), or the user's shell
would be left without echo. Piped stdin is relayed as it is, with no terminal to change.
"""

from __future__ import annotations

import contextlib
import os
import select
import termios
import threading
import tty
from collections.abc import Callable, Iterator

import websocket

from kubenova.plugin import stream

#: Ctrl-], as telnet and `virsh console` use: rare in a guest's own input.
ESCAPE = b"\x1d"


@contextlib.contextmanager
def raw(fd: int) -> Iterator[bool]:
    """The terminal at ``fd`` in raw mode for the block (yields True), restored however the block ends;
    not a terminal (a pipe, a file): left alone (yields False)."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def session(
    ws: websocket.WebSocket, stdin: int, write: Callable[[bytes], None], escape: bytes = ESCAPE
) -> stream.Closed | None:
    """Relay ``stdin`` to the console and its output to ``write`` until the server closes (returns how)
    or the escape key is read (returns None, after closing with 1000). At the end of piped stdin the
    output still flows: the guest may still be answering what was sent."""
    ended: list[stream.Closed] = []
    wake_r, wake_w = os.pipe()
    reader = threading.Thread(target=_down, args=(ws, write, ended, wake_w), daemon=True)
    reader.start()
    watched = [stdin, wake_r]
    try:
        while True:
            ready, _, _ = select.select(watched, [], [])
            if wake_r in ready:
                reader.join()
                return ended[0]
            data = os.read(stdin, stream.CHUNK)
            if not data:  # end of piped input: keep printing until the server ends
                watched = [wake_r]
                continue
            before, escaped, _ = data.partition(escape)
            if before and not stream.send(ws, before):
                continue  # the reader reports the end
            if escaped:
                stream.finish(ws, reader)
                return None
    finally:
        if reader.is_alive():  # interrupted (Ctrl-C on piped input) or failed: say so to the server
            stream.finish(ws)
        ws.shutdown()
        reader.join(5)
        if not reader.is_alive():  # else it may still write to the pipe: leave it open
            os.close(wake_r)
            os.close(wake_w)


def _down(
    ws: websocket.WebSocket, write: Callable[[bytes], None], ended: list[stream.Closed], wake: int
) -> None:
    ended.append(stream.downstream(ws, write))
    try:
        os.write(wake, b"x")
    except OSError:  # the session already ended (escape) and closed the pipe
        pass
