"""The controller's passes: work done in a thread of its own, asked for by events or by a timer."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")


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


def snapshot(index: Mapping[K, Iterable[V]]) -> list[tuple[K, list[V]]]:
    """A copy of one of kopf's indexes, for a pass in another thread: kopf changes them in its own thread
    meanwhile, and iterating one as it grows fails ("dictionary changed size during iteration"): 16
    placement passes failed so in one 10,000-instance run. A copy that failed is simply made again."""
    while True:
        try:
            return [(key, list(values)) for key, values in list(index.items())]
        except RuntimeError:
            continue
