"""The agent's cache keeps the newest version of each object: a queued watch event older than our own
write is dropped, and a re-list forgets only what it predates."""

from __future__ import annotations

from typing import Any

from kubenova.handlers.agent.cache import ObjectCache, compare
from tests.unit.reconcile_fakes import RecordingQueue


def obj(version: str, uid: str = "u1", **extra: Any) -> dict[str, Any]:
    return {"metadata": {"uid": uid, "namespace": "ns", "name": uid, "resourceVersion": version}, **extra}


def cache() -> ObjectCache:
    return ObjectCache(RecordingQueue(), "instance")  # type: ignore[arg-type]


def held(objects: ObjectCache, uid: str = "u1") -> str:
    return str(objects.objects[uid]["metadata"]["resourceVersion"])


def test_events_from_before_our_own_write_are_stale() -> None:
    objects = cache()
    objects.seen("ADDED", obj("5"))
    objects.written(obj("9"))
    objects.seen("MODIFIED", obj("7"))  # queued before our write: older than what we hold
    assert held(objects) == "9"
    objects.seen("MODIFIED", obj("10"))  # kopf may batch away our write's own event: newer still counts
    assert held(objects) == "10"


def test_a_write_answered_after_a_newer_event_is_old_news() -> None:
    objects = cache()
    objects.seen("MODIFIED", obj("10"))
    objects.written(obj("9"))
    assert held(objects) == "10"


def test_a_write_answered_after_the_object_left_does_not_bring_it_back() -> None:
    objects = cache()
    objects.seen("ADDED", obj("5"))
    objects.seen("DELETED", obj("6"))  # its label moved it to another node while our write was on its way
    objects.written(obj("5"))
    assert "u1" not in objects.objects


def test_a_relist_forgets_only_what_it_predates() -> None:
    objects = cache()
    forgotten: list[str] = []
    objects.on_forget(forgotten.append)
    objects.seen("ADDED", obj("1", uid="gone"))
    objects.seen("ADDED", obj("1", uid="listed"))
    objects.seen("ADDED", obj("3", uid="arrived"))  # after the LIST at version 2: not in it, newer than it
    objects.prune([obj("1", uid="listed")], "2")
    assert sorted(objects.objects) == ["arrived", "listed"] and forgotten == ["gone"]


def test_current_says_whether_a_newer_version_arrived() -> None:
    objects = cache()
    first = obj("1")
    objects.seen("ADDED", first)
    assert objects.current(first)
    objects.seen("MODIFIED", obj("2"))
    assert not objects.current(first)
    objects.forget(obj("2"))
    assert objects.current(first) and "u1" not in objects.objects


def test_resource_versions_compare_as_kubernetes_defines_them() -> None:
    """KEP-5504: integers of any length, compared as numbers, never as strings; anything else is not
    comparable, and an event that cannot be compared is kept rather than dropped."""
    assert compare("9", "10") == -1 and compare("10", "9") == 1 and compare("7", "7") == 0
    huge = "1" + "0" * 40  # beyond 64 bits: still a resourceVersion
    assert compare(huge, "99999999999999999999") == 1
    assert compare("", "1") is None and compare("0x1f", "2") is None and compare("012", "13") is None
    objects = cache()
    objects.seen("ADDED", obj("5"))
    objects.seen("MODIFIED", obj("opaque"))
    assert held(objects) == "opaque"
