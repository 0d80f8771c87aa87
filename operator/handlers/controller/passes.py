"""The controller's passes: work done in a thread of its own, asked for by events or by a timer."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def on_request(name: str, work: Callable[[], None]) -> Callable[[], None]:
    """Run ``work`` in a thread of its own, once per request, however many requests piled up meanwhile;
    returns the function that asks for a run."""
    wanted = threading.Event()

    def loop() -> None:
        while True:
            wanted.wait()
            wanted.clear()
            try:
                work()
            except Exception:  # the next request tries again
                log.exception("%s failed", name)

    threading.Thread(target=loop, daemon=True, name=name).start()
    return wanted.set


def every(interval: float, work: Callable[[], None]) -> None:
    """Call ``work`` every ``interval`` seconds (a resync: the safety net under event-driven passes)."""

    def loop() -> None:
        while True:
            time.sleep(interval)
            work()

    threading.Thread(target=loop, daemon=True, name="resync").start()
