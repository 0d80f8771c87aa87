"""The libvirt connection of one node: event loop, keepalive, reconnection; its domains as Guests, and the
host's own figures (memory, CPU).

libvirt delivers events and keepalives only while an event loop runs, so the default
implementation is registered once per process, before any connection is opened, and run
in a daemon thread. Callbacks run on that thread and must only hand work off.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable

import libvirt

from kubenova.driver.base import DriverError
from kubenova.driver.libvirt.errors import translate
from kubenova.driver.libvirt.guest import Guest
from kubenova.driver.libvirt.hostconfig import CPUConfig, DomainCapabilities

log = logging.getLogger(__name__)

LifecycleListener = Callable[[str, int, int], None]
#: How long a caller waits for libvirtd to accept a new connection.
OPEN_TIMEOUT = 10.0

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


class Host:
    """Owns the connection; reopens it after libvirtd went away and re-registers the callbacks."""

    def __init__(self, uri: str, events: bool = True) -> None:
        """``events``: register the domain event callbacks (the main connection); a side connection one
        thread uses alone (the DHCP lease watch) needs none."""
        self.uri = uri
        self.events = events
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()
        self._listeners: list[LifecycleListener] = []
        self._connection_listeners: list[Callable[[bool], None]] = []
        self._agent_listeners: list[Callable[[str], None]] = []
        self._callback_ids: list[int] = []
        self._lost = False
        self._attempt: concurrent.futures.Future[libvirt.virConnect] | None = None
        #: Connections found dead before their close callback came: held until it does, since libvirt
        #: calls it on a freed connection otherwise (a crash in libvirt.so).
        self._dead: list[libvirt.virConnect] = []

    def add_lifecycle_listener(self, listener: LifecycleListener) -> None:
        """``listener(uuid, event, detail)`` for every domain lifecycle event, across reconnects."""
        self._listeners.append(listener)

    def add_guest_agent_listener(self, listener: Callable[[str], None]) -> None:
        """``listener(uuid)`` whenever a domain's guest agent connects or disconnects, across reconnects."""
        self._agent_listeners.append(listener)

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
        uuid = Guest(dom).uuid
        for listener in self._listeners:
            try:
                listener(uuid, event, detail)
            except Exception:  # a listener's bug must not kill libvirt's event thread
                log.exception("lifecycle listener failed")

    def _agent_lifecycle(
        self, _conn: libvirt.virConnect, dom: libvirt.virDomain, _state: int, _reason: int, _opaque: object
    ) -> None:
        uuid = Guest(dom).uuid
        for listener in self._agent_listeners:
            try:
                listener(uuid)
            except Exception:  # a listener's bug must not kill libvirt's event thread
                log.exception("guest agent listener failed")

    def _closed(self, conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        with self._lock:
            if any(conn is dead for dead in self._dead):  # found dead on use before: now it may go
                self._dead = [dead for dead in self._dead if dead is not conn]
            if self._conn is not None and self._conn is not conn:  # an old connection's late word
                return
            self._conn = None
            self._callback_ids = []
            self._lost = True
        log.warning("libvirt connection to %s closed (reason %d); reconnecting on next use", self.uri, reason)
        self._tell(False)

    def get_connection(self) -> libvirt.virConnect:
        """The open connection, or a new one. Opening happens outside the lock and is bounded: a
        libvirtd that accepts but never answers (stopped, wedged) would otherwise hold every caller."""
        with self._lock:
            if self._conn is not None and self._conn.isAlive():
                return self._conn
            if self._conn is not None:  # died without the close callback yet: held until it comes
                self._dead.append(self._conn)
            self._lost = self._lost or self._conn is not None
            self._conn = None
        start_event_loop()
        conn = self._open()
        with self._lock:
            if self._conn is not None:  # another caller's attempt finished first
                if conn is not self._conn:
                    with contextlib.suppress(libvirt.libvirtError):
                        conn.close()
                return self._conn
            conn.setKeepAlive(5, 3)  # a connection whose libvirtd stops answering closes within ~20 s
            conn.registerCloseCallback(self._closed, None)
            self._callback_ids = (
                [
                    conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
                    ),
                    conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, self._agent_lifecycle, None
                    ),
                ]
                if self.events
                else []
            )
            self._conn = conn
            if self._lost:
                self._lost = False
                self._tell(True)
            return conn

    # --- domains ---------------------------------------------------------------------------

    def get_guest(self, uuid: str) -> Guest:
        """InstanceNotFound when no domain has that UUID."""
        with translate("lookup", uuid):
            return Guest(self.get_connection().lookupByUUIDString(uuid))

    def find_guest_by_name(self, name: str) -> Guest | None:
        try:
            return Guest(self.get_connection().lookupByName(name))
        except libvirt.libvirtError:
            return None

    def list_guests(self) -> list[Guest]:
        """Every domain, running or only defined."""
        guests = []
        for dom in self.get_connection().listAllDomains():
            try:
                guests.append(Guest(dom))
            except libvirt.libvirtError:
                continue  # gone meanwhile
        return guests

    def define(self, xml: str, uuid: str = "") -> Guest:
        """Define (or redefine) a persistent domain."""
        with translate("define", uuid):
            return Guest(self.get_connection().defineXML(xml))

    def has_nwfilter(self, name: str) -> bool:
        try:
            self.get_connection().nwfilterLookupByName(name)
        except libvirt.libvirtError:
            return False
        return True

    # --- the host's own figures ------------------------------------------------------------

    def memory_stats_kib(self) -> dict[str, int]:
        """The host's memory counters across NUMA cells (total, free, buffers, cached), in KiB."""
        with translate("getMemoryStats"):
            stats = self.get_connection().getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
        return {key: int(value) for key, value in stats.items()}

    def memory_mib(self) -> int:
        # getInfo sums NUMA cells, which can miss hot-added memory; the host-wide total does not.
        return self.memory_stats_kib()["total"] // 1024

    def free_memory_mib(self) -> int:
        """Memory the host can give now: free plus what the kernel reclaims on demand (buffers, page cache).

        The same figure as Nova's libvirt driver (total minus used, used being total - free - buffers -
        cached from /proc/meminfo), read through libvirtd so it is the hypervisor host's even when remote.
        getFreeMemory() (MemFree alone) would count a warm page cache as used and starve placement.
        """
        stats = self.memory_stats_kib()
        free = stats.get("free", 0) + stats.get("buffers", 0) + stats.get("cached", 0)
        return min(free, stats["total"]) // 1024

    def cpu(self) -> CPUConfig:
        """The host CPU as libvirt's capabilities describe it."""
        conn = self.get_connection()
        cpu = CPUConfig.from_capabilities(conn.getCapabilities(), arch=conn.getInfo()[0])
        if cpu is None:
            raise DriverError("libvirt's capabilities describe no host CPU")
        return cpu

    def domain_capabilities(self, domain_type: str) -> DomainCapabilities:
        """What libvirt says a domain of ``domain_type`` (kvm, qemu) can get on this host's architecture."""
        conn = self.get_connection()
        with translate("getDomainCapabilities"):
            return DomainCapabilities.parse_dom(
                conn.getDomainCapabilities(None, conn.getInfo()[0], None, domain_type, 0)
            )

    def compare_cpu(self, cpu: CPUConfig) -> int:
        """libvirt's verdict on running guests made for ``cpu`` here (a VIR_CPU_COMPARE_* code); libvirtError
        when libvirt cannot read the description."""
        return int(self.get_connection().compareCPU(cpu.to_xml(), 0))

    def _open(self) -> libvirt.virConnect:
        """libvirt.open, one attempt at a time on a thread of its own, waited for at most OPEN_TIMEOUT.
        An attempt that outlives its wait goes on; whoever comes next takes its result."""
        with self._lock:
            attempt = self._attempt
            if attempt is None:
                attempt = self._attempt = concurrent.futures.Future()
                # A daemon thread: a hung attempt must not keep the process from exiting.
                threading.Thread(
                    target=self._attempt_open, args=(attempt,), name="libvirt-open", daemon=True
                ).start()
        try:
            return attempt.result(timeout=OPEN_TIMEOUT)
        except concurrent.futures.TimeoutError as exc:
            raise DriverError(
                f"libvirtd at {self.uri} does not answer (no reply to a connection in {OPEN_TIMEOUT:g} s)"
            ) from exc
        except libvirt.libvirtError as exc:
            raise DriverError(f"cannot connect to libvirt at {self.uri}: {exc}") from exc
        finally:
            with self._lock:
                if attempt.done() and self._attempt is attempt:
                    self._attempt = None

    def _attempt_open(self, attempt: concurrent.futures.Future[libvirt.virConnect]) -> None:
        try:
            attempt.set_result(libvirt.open(self.uri))
        except BaseException as exc:  # handed to whoever waits on the attempt
            attempt.set_exception(exc)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            with contextlib.suppress(libvirt.libvirtError):
                for callback_id in self._callback_ids:
                    conn.domainEventDeregisterAny(callback_id)
                conn.unregisterCloseCallback()
                conn.close()
