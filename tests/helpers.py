"""Helpers for tests that wait on the real components."""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, Self, TypeVar

from Crypto.Cipher import DES

from kubenova.handlers.shared import GROUP, MIGRATIONS, VERSION, VIRTUALINSTANCES, VOLUMEATTACHMENTS

T = TypeVar("T")


def eventually(
    probe: Callable[[], T | None], timeout: float = 60, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll until `probe` returns something truthy; fail with `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def listeners(pids: set[int]) -> list[str]:
    """The listening sockets (``ss -Hltnup`` lines) of these processes, in this network namespace.

    Tests assert none of them is on 0.0.0.0, ``*`` or ``[::]``: nothing of ours listens on every interface.
    """
    out = subprocess.run(["ss", "-Hltnup"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids]


def on_every_interface(line: str) -> bool:
    return line.split()[4].startswith(("0.0.0.0:", "*:", "[::]:"))


def vnc_auth(host: str, port: int, password: str) -> bool:
    """An RFB 3.8 handshake with VNC authentication: True when the server accepts the password."""
    with socket.create_connection((host, port), timeout=10) as sock:
        f = sock.makefile("rwb")
        assert f.read(12).startswith(b"RFB 003.")
        f.write(b"RFB 003.008\n")
        f.flush()
        count = f.read(1)[0]
        types = f.read(count)
        assert list(types) == [2], f"the server must offer only VNC authentication, offered {list(types)}"
        f.write(b"\x02")
        f.flush()
        challenge = f.read(16)
        # VNC's DES key is the password, 8 bytes, each byte's bits mirrored.
        key = bytes(int(f"{b:08b}"[::-1], 2) for b in password.encode()[:8].ljust(8, b"\0"))
        f.write(DES.new(key, DES.MODE_ECB).encrypt(challenge))
        f.flush()
        (result,) = struct.unpack(">I", f.read(4))
        return result == 0


#: ERROR lines that are not failures of kubenova: kopf retrying a watch or request the apiserver refused
#: for a moment (it logs every retry as an error, and gives the reason). Everything else that says ERROR,
#: and every traceback, is a handler that failed.
EXPECTED_ERRORS = re.compile(r" ERROR kopf\._cogs\.clients\.\w+: Request attempt #\d+ failed; will retry: ")


def log_problems(text: str) -> list[str]:
    """The tracebacks (each with the line that logged it and its last line) and the unexpected ERROR lines."""
    problems: list[str] = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            end = next(
                (i for i in range(index + 1, len(lines)) if not lines[i].startswith((" ", "Traceback"))),
                len(lines) - 1,
            )
            problems.append(f"{lines[index - 1] if index else ''} ... {lines[end]}")
        elif " ERROR " in line and not EXPECTED_ERRORS.search(line):
            problems.append(line)
    return problems


#: Figures a test wants in the run's summary (the number of generated inputs, soak figures).
REPORT: list[str] = []


def empty_namespace(custom: Any, namespace: str, timeout: float = 180) -> None:
    """Delete kubenova's objects in ``namespace`` and wait until their finalizers let them go (their
    domains and disks are gone then). The namespace itself stays: without kube-controller-manager it
    would stay Terminating."""
    plurals = (MIGRATIONS, VOLUMEATTACHMENTS, VIRTUALINSTANCES)
    for plural in plurals:
        custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, plural)

    def left() -> list[str]:
        return [
            f"{o['kind']} {o['metadata']['name']}"
            for plural in plurals
            for o in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]
        ]

    try:
        eventually(lambda: not left(), timeout=timeout)
    except AssertionError:
        raise AssertionError(f"namespace {namespace} still holds {left()}") from None


class PacketWatch:
    """Every frame through a network link (a raw packet socket on it, ETH_P_ALL: a bridge port's frames
    reach only the taps that take every protocol), handed to ``seen`` on a thread of its own while in use."""

    def __init__(self, link: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((link, 0))
        self.sock.settimeout(0.2)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def seen(self, frame: bytes) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                frame = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.seen(frame)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self.sock.close()
