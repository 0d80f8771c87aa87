"""The agent's cache tells stale watch events by their order, never by reading resourceVersions as numbers
(Kubernetes defines them as opaque; after an etcd restore, newer versions can be smaller)."""

from __future__ import annotations

from typing import Any

from kubenova.handlers.agent.cache import WRITE_ECHO_TIMEOUT, ObjectCache
from tests.unit.reconcile_fakes import RecordingQueue


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def obj(version: str, uid: str = "u1", **extra: Any) -> dict[str, Any]:
    return {"metadata": {"uid": uid, "namespace": "ns", "name": uid, "resourceVersion": version}, **extra}


def cache() -> tuple[ObjectCache, Clock]:
    clock = Clock()
    return ObjectCache(RecordingQueue(), "instance", clock), clock  # type: ignore[arg-type]


def held(objects: ObjectCache, uid: str = "u1") -> str:
    return str(objects.objects[uid]["metadata"]["resourceVersion"])


def test_events_from_before_our_own_write_are_stale_until_its_echo() -> None:
    objects, _ = cache()
    objects.seen("ADDED", obj("5"))
    objects.written(obj("9"))
    objects.seen("MODIFIED", obj("7"))  # queued before our write: older than what we hold
    assert held(objects) == "9"
    objects.seen("MODIFIED", obj("9"))  # the watch reaches our write
    objects.seen("MODIFIED", obj("10"))
    assert held(objects) == "10"


def test_versions_are_never_compared_as_numbers() -> None:
    """After an etcd restore a newer version may be a smaller number: the watch's order is what counts."""
    objects, _ = cache()
    objects.seen("ADDED", obj("100"))
    objects.seen("MODIFIED", obj("3"))
    assert held(objects) == "3"
    objects.written(obj("2"))
    objects.seen("MODIFIED", obj("2"))
    objects.seen("MODIFIED", obj("1"))
    assert held(objects) == "1"


def test_a_listing_is_current_and_an_unechoed_write_is_believed_only_so_long() -> None:
    objects, clock = cache()
    objects.written(obj("9"))
    objects.seen(None, obj("12"))  # a re-list after the watch broke: newer than the write
    assert held(objects) == "12"
    objects.written(obj("13"))
    objects.seen("MODIFIED", obj("11"))
    assert held(objects) == "13"
    clock.now += WRITE_ECHO_TIMEOUT  # the watch restarted past our version: it never comes
    objects.seen("MODIFIED", obj("14"))
    assert held(objects) == "14"


def test_a_write_answered_after_its_echo_is_old_news() -> None:
    """The watch can be faster than the write's answer, and deliver a newer version too."""
    objects, _ = cache()
    objects.seen("MODIFIED", obj("9"))
    objects.seen("MODIFIED", obj("10"))
    objects.written(obj("9"))
    assert held(objects) == "10"
    objects.seen("MODIFIED", obj("11"))
    assert held(objects) == "11"


def test_a_relist_forgets_only_what_it_predates() -> None:
    objects, clock = cache()
    forgotten: list[str] = []
    objects.on_forget(forgotten.append)
    objects.seen("ADDED", obj("1", uid="gone"))
    objects.seen("ADDED", obj("1", uid="listed"))
    clock.now += 1
    started = objects.now()
    clock.now += 1
    objects.seen("ADDED", obj("2", uid="arrived"))  # after the LIST began: not in it, newer than it
    objects.prune([obj("1", uid="listed")], started)
    assert sorted(objects.objects) == ["arrived", "listed"] and forgotten == ["gone"]


def test_current_says_whether_a_newer_version_arrived() -> None:
    objects, _ = cache()
    first = obj("1")
    objects.seen("ADDED", first)
    assert objects.current(first)
    objects.seen("MODIFIED", obj("2"))
    assert not objects.current(first)
    objects.forget(obj("2"))
    assert objects.current(first) and "u1" not in objects.objects
