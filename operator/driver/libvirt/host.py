"""The libvirt connection of one node: event loop, keepalive, reconnection, error translation.

libvirt delivers events and keepalives only while an event loop runs, so the default
implementation is registered once per process, before any connection is opened, and run
in a daemon thread. Callbacks run on that thread and must only hand work off.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

import libvirt

from kubenova.driver.base import DriverError, InstanceNotFound, InstanceNotRunning

log = logging.getLogger(__name__)

LifecycleListener = Callable[[str, int, int], None]

_loop_lock = threading.Lock()
_loop_started = False


def _silence(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them as exceptions instead."""


def start_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once per process)."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.registerErrorHandler(_silence, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


@contextlib.contextmanager
def translate(operation: str, uuid: str = "") -> Iterator[None]:
    """The one place libvirt's error codes become the contract's exceptions."""
    try:
        yield
    except libvirt.libvirtError as exc:
        code = exc.get_error_code()
        if code == libvirt.VIR_ERR_NO_DOMAIN:
            raise InstanceNotFound(uuid) from exc
        if code == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in str(exc):
            raise InstanceNotRunning(f"{operation}: the instance is not running") from exc
        raise DriverError(f"{operation} failed: {exc}") from exc


class Host:
    """Owns the connection; reopens it after libvirtd went away and re-registers the callbacks."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()
        self._listeners: list[LifecycleListener] = []
        self._connection_listeners: list[Callable[[bool], None]] = []
        self._callback_id: int | None = None
        self._lost = False

    def add_lifecycle_listener(self, listener: LifecycleListener) -> None:
        """``listener(uuid, event, detail)`` for every domain lifecycle event, across reconnects."""
        self._listeners.append(listener)

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None:
        """``listener(False)`` when the connection closes, ``listener(True)`` when a later one opens."""
        self._connection_listeners.append(listener)

    def _tell(self, up: bool) -> None:
        for listener in self._connection_listeners:
            try:
                listener(up)
            except Exception:  # a listener's bug must not break the connection handling
                log.exception("connection listener failed")

    def _lifecycle(
        self, _conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, detail: int, _opaque: object
    ) -> None:
        uuid = dom.UUIDString()
        for listener in self._listeners:
            try:
                listener(uuid, event, detail)
            except Exception:  # a listener's bug must not kill libvirt's event thread
                log.exception("lifecycle listener failed")

    def _closed(self, _conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        log.warning("libvirt connection to %s closed (reason %d); reconnecting on next use", self.uri, reason)
        with self._lock:
            self._conn = None
            self._callback_id = None
            self._lost = True
        self._tell(False)

    def get_connection(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None and self._conn.isAlive():
                return self._conn
            self._lost = self._lost or self._conn is not None  # died without the close callback
            start_event_loop()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise DriverError(f"cannot connect to libvirt at {self.uri}: {exc}") from exc
            conn.setKeepAlive(5, 3)
            conn.registerCloseCallback(self._closed, None)
            self._callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
            )
            self._conn = conn
            if self._lost:
                self._lost = False
                self._tell(True)
            return conn

    def lookup(self, uuid: str) -> libvirt.virDomain:
        with translate("lookup", uuid):
            return self.get_connection().lookupByUUIDString(uuid)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            with contextlib.suppress(libvirt.libvirtError):
                if self._callback_id is not None:
                    conn.domainEventDeregisterAny(self._callback_id)
                conn.unregisterCloseCallback()
                conn.close()
