"""The agent's work queue: dedupe, one worker per object, delayed adds, backoff."""

from __future__ import annotations

import threading
import time

from kubenova.handlers.agent.workqueue import WorkQueue
from tests.helpers import eventually


def test_a_key_added_many_times_while_waiting_runs_once() -> None:
    ran: list[str] = []
    gate = threading.Event()
    queue = WorkQueue(workers=1)
    for _ in range(5):
        queue.add(("a", "x"))
    queue.start({"a": lambda uid: (gate.wait(5), ran.append(uid))})
    gate.set()
    eventually(lambda: ran == ["x"], timeout=5)
    time.sleep(0.2)
    assert ran == ["x"]
    queue.stop()


def test_one_object_is_never_worked_on_by_two_workers_and_a_late_add_runs_again() -> None:
    running: set[str] = set()
    overlaps: list[str] = []
    runs: list[tuple[str, str]] = []
    release = threading.Event()

    def work(kind: str) -> object:
        def handler(uid: str) -> None:
            if uid in running:
                overlaps.append(uid)
            running.add(uid)
            if len(runs) == 0:
                release.wait(5)  # hold the first run while more keys of the same object arrive
            runs.append((kind, uid))
            running.discard(uid)

        return handler

    queue = WorkQueue(workers=4)
    queue.start({"instance": work("instance"), "observe": work("observe")})  # type: ignore[dict-item]
    queue.add(("instance", "x"))
    eventually(lambda: "x" in running, timeout=5)
    queue.add(("observe", "x"))  # another kind of work on the same object: waits
    queue.add(("instance", "x"))  # the same key while it runs: runs once more afterwards
    time.sleep(0.2)
    assert runs == []
    release.set()
    eventually(lambda: len(runs) == 3, timeout=5)
    assert not overlaps and sorted(runs[1:]) == [("instance", "x"), ("observe", "x")]
    queue.stop()


def test_delayed_adds_and_backoff_doubling_to_the_limit() -> None:
    now = [0.0]
    queue = WorkQueue(workers=0, max_backoff=10, clock=lambda: now[0])
    assert [queue.retry(("a", "x")) for _ in range(5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    queue.forget(("a", "x"))
    assert queue.retry(("a", "x")) == 2.0
    ran: list[str] = []
    timed = WorkQueue(workers=1)
    timed.start({"a": ran.append})
    timed.add_after(("a", "late"), 0.3)
    timed.add(("a", "soon"))
    eventually(lambda: ran == ["soon"], timeout=5)
    eventually(lambda: ran == ["soon", "late"], timeout=5)
    timed.stop()


def test_a_failing_handler_does_not_end_its_worker() -> None:
    ran: list[str] = []

    def handler(uid: str) -> None:
        ran.append(uid)
        if uid == "bad":
            raise RuntimeError("a bug")

    queue = WorkQueue(workers=1)
    queue.start({"a": handler})
    queue.add(("a", "bad"))
    queue.add(("a", "good"))
    eventually(lambda: ran == ["bad", "good"], timeout=5)
    queue.stop()
