"""The placement pass: every pending instance decided in turn, on one view of the cluster, and the binds
sent in parallel.

Deciding stays serial, under the reservations' lock, so each decision sees every earlier one. Binding
is one PATCH per instance, and a pass that waited for each before deciding the next bound about 30 per
second: at 2,000 instances on 100 nodes the median instance waited 32 s for its node while the
controller's CPU idled. The binds now go to a small pool; a bound instance's capacity is reserved before
its PATCH leaves, and given back if the PATCH is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kubernetes

from kubenova.handlers.controller import binding
from kubenova.handlers.controller.passes import every, on_request
from kubenova.handlers.controller.placement import NodeView, Usage
from kubenova.handlers.controller.reservations import Reservations

log = logging.getLogger(__name__)

#: After a failed placement write, the next pass over every pending instance.
PLACEMENT_RETRY = 5.0
#: How long a placement pass decides on one reading of the nodes and their usage.
VIEW_SECONDS = 1.0
#: A pass over the pending instances at least this often, whatever the events said.
PENDING_RESYNC = 60.0
#: Binds in flight at once. The apiserver serves a few in parallel on two CPUs; more only queue there.
BIND_WORKERS = 8
#: Decided binds waiting for a worker: a pass does not run far ahead of its binds, whose reservations
#: would otherwise age while they wait.
BIND_BACKLOG = 2 * BIND_WORKERS

View = Callable[[], tuple[dict[str, NodeView], dict[str, Usage]]]


class Placing:
    """Places the pending instances ``pending`` returns, on the nodes and usage ``view`` reads (called
    under the reservations' lock). ``request`` asks for a pass."""

    def __init__(
        self,
        api: kubernetes.client.CustomObjectsApi,
        reservations: Reservations,
        pending: Callable[[], list[Mapping[str, Any]] | None],
        view: View,
    ) -> None:
        self.api = api
        self.reservations = reservations
        self._pending = pending
        self._view = view
        #: uid -> the resourceVersion an Unschedulable status was last written from (binding.choose)
        self._written: dict[str, str] = {}
        self._binds = ThreadPoolExecutor(BIND_WORKERS, thread_name_prefix="bind")
        self._slots = threading.BoundedSemaphore(BIND_WORKERS + BIND_BACKLOG)
        self._away = threading.Event()  # a write failed: this pass stops, the timer's tries them all again
        self._timer_lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.request = on_request("retry-pending", self._pass)
        every(PENDING_RESYNC, self.request)  # the safety net under the event-driven passes, like a resync

    def forget(self, uid: str) -> None:
        """The instance was bound or deleted: what was written for it no longer matters."""
        self._written.pop(uid, None)

    def _pass(self) -> None:
        """One pass over every unbound instance, on a reading of the nodes and their usage made each
        VIEW_SECONDS: a reading walks every node and bound instance (made per instance, a burst cost the
        square of its size); one older than the heartbeat grace calls live nodes dead."""
        pending = self._pending()
        if pending is None:
            return  # no node has been seen yet: nothing can be placed
        self._away.clear()
        fresh_until, nodes, used = 0.0, dict[str, NodeView](), dict[str, Usage]()
        for body in pending:
            if self._away.is_set():
                return
            self._slots.acquire()  # outside the lock: the planner reads capacity while binds drain
            sent = False
            try:
                with self.reservations.lock:  # taken per instance: a long pass must not stall the planner
                    if time.monotonic() > fresh_until:
                        nodes, used = self._view()
                        fresh_until = time.monotonic() + VIEW_SECONDS
                    node = self._decide(body, nodes, used)
                if node:
                    self._binds.submit(self._bind, body, node)
                    sent = True
            finally:
                if not sent:
                    self._slots.release()

    def _decide(
        self, body: Mapping[str, Any], nodes: Mapping[str, NodeView], used: dict[str, Usage]
    ) -> str | None:
        """The node for one instance, reserved and counted in ``used`` at once; None: nothing to bind."""
        uid = body["metadata"]["uid"]
        if self.reservations.made(uid):
            return None  # bound a moment ago, or its bind is in flight: this is an older copy
        try:
            node = binding.choose(self.api, body, nodes, used, self._written)
        except Exception as exc:  # the apiserver or etcd is away: an event handler's failure is not retried
            self._failed(body, exc)
            return None
        if node:
            request = binding.request_of(body.get("spec") or {})
            self.reservations.add(uid, node, request)
            used[node] = used.get(node, Usage()) + request
        return node

    def _bind(self, body: Mapping[str, Any], node: str) -> None:
        """One bind, in a worker; a refused or failed one gives its reservation back."""
        bound = False
        try:
            bound = binding.bind(self.api, body, node)
        except Exception as exc:
            self._failed(body, exc)
        finally:
            self._slots.release()
            if not bound:  # changed meanwhile (its watch event asks for a pass) or the apiserver is away
                self.reservations.release(body["metadata"]["uid"])

    def _failed(self, body: Mapping[str, Any], exc: Exception) -> None:
        """A write failed: stop this pass and try every pending instance again in PLACEMENT_RETRY."""
        self._away.set()
        with self._timer_lock:
            if self._timer is not None and self._timer.is_alive():
                return  # one retry is enough, however many binds failed
            log.warning(
                "placing %s/%s failed (%s); all pending instances get another pass in %.0fs",
                body["metadata"]["namespace"],
                body["metadata"]["name"],
                exc,
                PLACEMENT_RETRY,
            )
            self._timer = threading.Timer(PLACEMENT_RETRY, self.request)
            self._timer.daemon = True
            self._timer.start()
