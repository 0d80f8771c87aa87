"""The controller's reservations: capacity its recent binds hold until its usage index sees them."""

from __future__ import annotations

import threading
import time

import kopf

from kubenova.handlers.controller.passes import snapshot
from kubenova.handlers.controller.placement import Usage

#: How long a bind the usage index has not seen holds its capacity (a deleted instance may never show up).
RESERVATION_SECONDS = 60.0


class Reservations:
    """Binds the controller made that its usage index has not seen yet.

    Without them, placements decided in quick succession all see the same free capacity and
    overfill a node (a burst of 50 once put 37 one-vCPU instances where 32 fit). Placement
    runs under one lock, so each decision sees every earlier one.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._pending: dict[str, tuple[str, Usage, float]] = {}

    def add(self, uid: str, node: str, usage: Usage) -> None:
        self._pending[uid] = (node, usage, time.monotonic())

    def made(self, uid: str) -> bool:
        """Whether this controller bound the instance and its usage index has not caught up yet."""
        return uid in self._pending

    def release(self, uid: str) -> None:
        """The instance is gone: what it reserved is free at once, not after RESERVATION_SECONDS."""
        with self.lock:
            self._pending.pop(uid, None)

    def totals(self, index: kopf.Index[str, tuple[str, Usage]]) -> dict[str, Usage]:
        totals: dict[str, Usage] = {}
        seen = set()
        for node, entries in snapshot(index):
            for uid, usage in entries:
                seen.add(uid)
                totals[node] = totals.get(node, Usage()) + usage
        stale = time.monotonic() - RESERVATION_SECONDS  # deleted before the index saw it bound
        for uid in [u for u, (_, _, made) in self._pending.items() if u in seen or made < stale]:
            del self._pending[uid]
        for node, usage, _ in self._pending.values():
            totals[node] = totals.get(node, Usage()) + usage
        return totals
