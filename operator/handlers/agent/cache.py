"""What the agent's watches last saw of each object (an informer's store), and how work on it is asked for."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from kubenova.handlers.agent.workqueue import WorkQueue

log = logging.getLogger(__name__)


def version(body: Mapping[str, Any]) -> str:
    return str(body["metadata"].get("resourceVersion", ""))


def compare(a: str, b: str) -> int | None:
    """-1, 0 or 1 as resourceVersion ``a`` is older than, the same as or newer than ``b`` (of one
    resource), None when either is not a well-formed one.

    Kubernetes 1.35 made resourceVersions comparable (KEP-5504: monotonically increasing integers of
    any length, compared per resource, as client-go's ``CompareResourceVersion`` does); before, they
    were opaque. Ordering by the watch alone is no substitute: kopf batches an object's events and may
    never deliver the version our own write produced. An etcd restored from a backup keeps them
    increasing when restored as Kubernetes documents it (etcdutl's --bump-revision and
    --mark-compacted); docs/operations.md says so.
    """
    if (
        not (a.isdigit() and b.isdigit())
        or (a != "0" and a.startswith("0"))
        or (b != "0" and b.startswith("0"))
    ):
        return None
    return (int(a) > int(b)) - (int(a) < int(b))


def older(body: Mapping[str, Any], than: Mapping[str, Any] | None) -> bool:
    """Whether ``body`` is an older version than ``than``; a version that cannot be compared is not."""
    return than is not None and compare(version(body), version(than)) == -1


class ObjectCache:
    """The newest version of each watched object of one kind, by UID.

    Work on an object is asked for through the agent's queue under the key (kind, uid); the
    reconciler of that kind is the queue's handler for it. Whoever keeps something per object
    subscribes to ``on_forget``, so a long-lived agent does not grow.
    """

    def __init__(self, queue: WorkQueue, kind: str) -> None:
        self.queue = queue
        self.kind = kind
        self.objects: dict[str, dict[str, Any]] = {}
        self._forget: list[Callable[[str], None]] = []
        # Watch events (kopf's threads) and write answers (the queue's workers) meet here.
        self._lock = threading.RLock()

    def on_forget(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(uid)`` once an object is gone from the cache."""
        self._forget.append(callback)

    def find(self, namespace: str, name: str) -> dict[str, Any] | None:
        for body in list(self.objects.values()):
            meta = body["metadata"]
            if meta["namespace"] == namespace and meta["name"] == name:
                return body
        return None

    # --- asking for work ---------------------------------------------------------------------------

    def look(self, uid: str) -> None:
        """Have the reconciler look at the object as soon as it can."""
        self.queue.add((self.kind, uid))

    def schedule(self, uid: str, delay: float) -> None:
        """Have the reconciler look at the object in ``delay`` seconds."""
        self.queue.add_after((self.kind, uid), delay)

    def retry_later(self, uid: str) -> None:
        """Another look after a failure, with the queue's backoff, so a broken object never storms."""
        self.queue.retry((self.kind, uid))

    def succeeded(self, uid: str) -> None:
        self.queue.forget((self.kind, uid))

    # --- what the watches say ----------------------------------------------------------------------

    def seen(self, event_type: str | None, body: Mapping[str, Any]) -> str:
        """Record a watch event; returns the object's UID. A queued event may predate our own last write:
        an older version than the one held is dropped."""
        uid = str(body["metadata"]["uid"])
        log.debug(
            "watch event %s for %s/%s (%s)",
            event_type,
            body["metadata"]["namespace"],
            body["metadata"]["name"],
            uid,
        )
        if event_type == "DELETED":
            self._drop(uid)
            return uid
        with self._lock:
            if not older(body, self.objects.get(uid)):
                self.objects[uid] = dict(body)
        return uid

    def written(self, body: Mapping[str, Any]) -> None:
        """Record the answer to our own write, unless the watch brought a newer version meanwhile, or said
        the object left (deleted, or its label moved it to another node) while the write was on its way:
        an answer never brings back what the watch dropped, which no later event would drop again."""
        uid = str(body["metadata"]["uid"])
        with self._lock:
            held = self.objects.get(uid)
            if held is not None and not older(body, held):
                self.objects[uid] = dict(body)

    def current(self, body: Mapping[str, Any]) -> bool:
        """Whether ``body`` is still the newest version held (or none is held any more)."""
        return not older(body, self.objects.get(str(body["metadata"]["uid"])))

    def forget(self, body: Mapping[str, Any]) -> None:
        """Forget the object here (it left this node), as if its watch had said it was deleted."""
        self._drop(str(body["metadata"]["uid"]))

    def prune(self, listed: list[dict[str, Any]], listed_version: str) -> None:
        """Forget cached objects a fresh LIST at ``listed_version`` no longer has (kopf's re-list after a
        broken watch reports what exists, never what left the selector meanwhile)."""
        present = {item["metadata"]["uid"] for item in listed}
        for uid, body in list(self.objects.items()):
            if uid not in present and not older({"metadata": {"resourceVersion": listed_version}}, body):
                log.info(
                    "forgetting %s/%s: it is no longer bound here",
                    body["metadata"]["namespace"],
                    body["metadata"]["name"],
                )
                self._drop(uid)

    def _drop(self, uid: str) -> None:
        with self._lock:
            self.objects.pop(uid, None)
        self.queue.drop(uid)
        for forget in self._forget:
            forget(uid)
