"""A libvirtd that accepts connections but never answers (SIGSTOPped, wedged) must not hold the agent:
opening a connection is bounded, and callers wait on one attempt, never on each other's lock."""

from __future__ import annotations

import pathlib
import socket
import threading
import time

import pytest

from kubenova.driver.base import DriverError
from kubenova.driver.libvirt import host as libvirt_host


def test_a_libvirtd_that_never_answers_is_reported_in_bounded_time(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(libvirt_host, "OPEN_TIMEOUT", 1.0)
    path = tmp_path / "libvirt-sock"
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(path))
    silent.listen(8)  # the kernel accepts into the backlog; nobody ever reads or answers
    host = libvirt_host.Host(f"qemu:///system?socket={path}")
    errors: list[str] = []

    def connect() -> None:
        try:
            host.get_connection()
        except DriverError as exc:
            errors.append(str(exc))

    started = time.monotonic()
    callers = [threading.Thread(target=connect) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=10)
    took = time.monotonic() - started
    assert len(errors) == 3 and all("does not answer" in e for e in errors), errors
    assert took < 3, f"the callers waited on each other: {took:.1f} s for a 1 s limit"
    silent.close()
