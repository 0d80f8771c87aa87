"""The fake guest's serial port as a real unix socket, so the agent's access server can be tested end to end.

QEMU listens on a running guest's console socket and takes one client at a time; the fake's guest echoes
what it is sent (a shell at a login prompt echoes what is typed) and logs it, as virtlogd would. A server
exists only once someone asks for the console (get_serial_console), so a scale benchmark's thousand fake
instances hold no sockets or threads; it polls the instance's state while a client is connected, and when
the guest stops it closes the connection, as QEMU does when its process ends.
"""

from __future__ import annotations

import contextlib
import pathlib
import socket
import threading
from collections.abc import Callable

#: How often a connected console asks whether its guest still runs.
POLL = 0.1


class EchoConsole:
    """One guest's serial socket: accepts a client, echoes its bytes and appends them to ``log``."""

    def __init__(self, path: pathlib.Path, log: pathlib.Path, running: Callable[[], bool]) -> None:
        """``running`` says whether the guest still runs; once it does not, the console closes for good."""
        self.path, self.log, self.running = path, log, running
        path.unlink(missing_ok=True)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._server.settimeout(POLL)
        self.closed = False
        threading.Thread(target=self._serve, daemon=True, name=f"fake-console-{path.stem}").start()

    def close(self) -> None:
        self.closed = True

    def _serve(self) -> None:
        try:
            while not self.closed and self.running():
                try:
                    client, _ = self._server.accept()
                except TimeoutError:
                    continue
                with client:
                    self._echo(client)
        finally:
            self.closed = True
            self._server.close()
            self.path.unlink(missing_ok=True)

    def _echo(self, client: socket.socket) -> None:
        """Echo until the client leaves or the guest stops (then the client sees the socket close)."""
        client.settimeout(POLL)
        while not self.closed and self.running():
            try:
                data = client.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            with contextlib.suppress(OSError):
                client.sendall(data)
            with self.log.open("ab") as log:
                log.write(data)
