"""The agent's one work queue, in the shape of client-go's (KubeVirt's virt-handler drains one like it).

Everything that wants an object looked at adds its key: watch events (after the newest body is
recorded), libvirt lifecycle events, retries, resyncs. A fixed pool of worker threads takes keys off
and runs the handler of the key's kind. The queue keeps four promises, so no handler needs its own
bookkeeping:

- **dedupe**: a key waiting in the queue is there once, however many times it was added;
- **one at a time per object**: two keys of the same object (its instance and its lifecycle look,
  say) never run at once; a key added while its object is being worked on runs again afterwards;
- **delayed adds**: ``add_after`` (a restart after a delay, an auto-confirm deadline);
- **backoff**: ``retry`` re-adds a failed key after 2 s, doubling up to ``max_backoff``, and
  ``forget`` resets it after a success, so a broken object never storms.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

#: (kind, uid): the kind names the handler, the uid the object the work is about.
Key = tuple[str, str]
FIRST_BACKOFF = 2.0


class WorkQueue:
    def __init__(
        self, workers: int, max_backoff: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._handlers: dict[str, Callable[[str], None]] = {}
        self._workers = workers
        self.max_backoff = max_backoff
        self._clock = clock
        self._cond = threading.Condition()
        self._ready: list[Key] = []  # due keys, in the order they became due
        self._queued: set[Key] = set()  # in _ready: dedupe
        self._later: list[tuple[float, int, Key]] = []  # (due, sequence, key): delayed adds
        self._sequence = itertools.count()
        self._busy: set[str] = set()  # uids a worker is on
        self._dirty: set[Key] = set()  # added while their object was busy: run again afterwards
        self._failures: dict[Key, int] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self._last_done = clock()
        self._backlog_since = clock()  # when the keys now waiting began to wait

    # --- adding ----------------------------------------------------------------------------------

    def add(self, key: Key) -> None:
        """Look at this key as soon as a worker is free (and its object is not being worked on)."""
        with self._cond:
            self._add(key)

    def add_after(self, key: Key, delay: float) -> None:
        """Look at this key in ``delay`` seconds (at once when ``delay`` is not positive)."""
        with self._cond:
            if delay <= 0:
                self._add(key)
                return
            heapq.heappush(self._later, (self._clock() + delay, next(self._sequence), key))
            self._cond.notify()

    def retry(self, key: Key) -> float:
        """Another look after a failure: 2 s, doubling up to max_backoff. Returns the delay chosen."""
        with self._cond:
            attempt = self._failures.get(key, 0)
            self._failures[key] = attempt + 1
        delay = float(min(self.max_backoff, FIRST_BACKOFF * 2**attempt))
        self.add_after(key, delay)
        return delay

    def forget(self, key: Key) -> None:
        """The key's work succeeded (or its object is gone): the next failure starts the backoff again."""
        with self._cond:
            self._failures.pop(key, None)

    def drop(self, uid: str) -> None:
        """The object is gone: forget its backoffs and lock (its delayed adds find nothing to do)."""
        with self._cond:
            for key in [k for k in self._failures if k[1] == uid]:
                del self._failures[key]
            if uid not in self._busy:
                self._locks.pop(uid, None)

    @contextmanager
    def lock(self, uid: str) -> Iterator[None]:
        """Hold the object for work done outside the queue (the diagnostics round writes status too)."""
        with self._cond:
            lock = self._locks.setdefault(uid, threading.Lock())
        with lock:
            yield

    @contextmanager
    def lock_if_free(self, uid: str) -> Iterator[bool]:
        """Hold the object only if nobody does now; yields whether it is held. For work outside the queue
        that may as well wait for a later turn than for a long piece of work (a snapshot) to end."""
        with self._cond:
            lock = self._locks.setdefault(uid, threading.Lock())
        held = lock.acquire(blocking=False)
        try:
            yield held
        finally:
            if held:
                lock.release()

    def _add(self, key: Key) -> None:
        if key[1] in self._busy:
            self._dirty.add(key)
        elif key not in self._queued:
            if not self._ready:
                self._backlog_since = self._clock()
            self._queued.add(key)
            self._ready.append(key)
            self._cond.notify()

    # --- draining --------------------------------------------------------------------------------

    def start(self, handlers: dict[str, Callable[[str], None]]) -> None:
        """Start draining with a handler per kind (the reconcilers exist by now, and they hold the queue)."""
        self._handlers = dict(handlers)
        for index in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _next(self) -> Key | None:
        """The next key whose object nobody works on; waits for one. None once stopped."""
        with self._cond:
            while not self._stopped:
                now = self._clock()
                while self._later and self._later[0][0] <= now:
                    self._add(heapq.heappop(self._later)[2])
                for index, key in enumerate(self._ready):
                    if key[1] not in self._busy:
                        del self._ready[index]
                        self._queued.discard(key)
                        self._busy.add(key[1])
                        return key
                timeout = self._later[0][0] - now if self._later else None
                self._cond.wait(timeout)
            return None

    def stalled_for(self) -> float:
        """Seconds that due work has waited without any worker finishing anything (0 when nothing
        waits): a wedge, which a long piece of work (a live transfer holds its worker for minutes) is
        not as long as the other workers move."""
        with self._cond:
            if not any(key[1] not in self._busy for key in self._ready):
                return 0.0
            return max(0.0, self._clock() - max(self._last_done, self._backlog_since))

    def _done(self, key: Key) -> None:
        with self._cond:
            self._last_done = self._clock()
            self._busy.discard(key[1])
            for again in [k for k in self._dirty if k[1] == key[1]]:
                self._dirty.discard(again)
                self._add(again)
            self._cond.notify_all()

    def _work(self) -> None:
        while (key := self._next()) is not None:
            try:
                with self.lock(key[1]):
                    self._handlers[key[0]](key[1])
            except Exception:  # a handler's bug must not end a worker; its own errors are its to retry
                log.exception("%s %s failed", *key)
            finally:
                self._done(key)


async def every(interval: float, work: Callable[[], None], what: str) -> None:
    """The agent's periodic work (resync, reports, diagnostics), each round in a thread so kopf's loop never
    waits, every ``interval`` from each round's start: a round spread over time keeps its period."""
    due = time.monotonic() + interval
    while True:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        due = time.monotonic() + interval
        try:
            await asyncio.to_thread(work)
        except Exception as exc:  # a periodic task outlives a failed round (apiserver or libvirt hiccup)
            log.warning("%s failed: %s", what, exc)
