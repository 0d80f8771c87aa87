"""Node health, controller side: a node whose agent stopped renewing its Lease is unreachable.

Like Kubernetes' node lifecycle controller, expiry is reckoned from when the controller *saw* a
renewal, never from the agent's clock: a node with a skewed clock is neither dead nor immortal,
and a controller that just started gives every node a whole Lease duration first. An unreachable
node's ComputeNode and its instances get ``Ready=Unknown`` (reason ``NodeUnreachable``); nothing
else changes there. Its agent writes the truth again when it is back, and nothing is started
anywhere else unless the node is fenced (docs/operations.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import kubernetes

from kubenova.handlers.shared import (
    COMPUTENODES,
    GROUP,
    MIGRATIONS,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    StatusWriter,
    condition,
    is_final,
    now,
    post_event,
    set_condition,
    typed,
)

log = logging.getLogger(__name__)
REASON = "NodeUnreachable"
#: While a node stays unreachable, its instances are looked at again this often (one bound meanwhile,
#: or a write that lost a race, gets its Unknown too).
REMARK_INTERVAL = 30.0
#: How long a Migration waits for an unreachable node whose turn it is before it ends.
MIGRATION_GRACE = 30.0
#: The steps a Migration can end in without its unreachable owner, because where the guest runs is
#: known (the source) whatever that node did: (type, step) -> the side whose turn it is.
ENDABLE = {
    ("Live", "PrepareTarget"): "target",
    ("Live", "Transfer"): "source",
    ("Live", "RollbackTarget"): "target",
    ("Cold", "PowerOffSource"): "source",
}


def abandoned(body: Mapping[str, Any], down: Mapping[str, float]) -> dict[str, Any] | None:
    """The status patch that ends (or rolls back) a Migration stuck on an unreachable node, or None.

    Only where the guest is known to run on the source: before the transfer began (the source marks
    ``Transferring`` before any byte moves), or in the target's rollback, which the source names only
    after it saw the guest running at home. Anywhere else the guest may be on either node, and only
    the node's return says where; the Migration keeps its slot until then.
    """
    spec, status = body.get("spec") or {}, body.get("status") or {}
    side = ENDABLE.get((spec.get("type", ""), status.get("step", "")))
    if side is None:
        return None
    node = status.get(f"{side}Node", "")
    if down.get(node, 0.0) < MIGRATION_GRACE:
        return None
    source, target = status.get("sourceNode", ""), status.get("targetNode", "")
    lost = f"{side} {node} has been unreachable for over {MIGRATION_GRACE:.0f} s (its agent's Lease expired)"
    if status.get("step") == "Transfer" and target not in down:
        return {
            "step": "RollbackTarget",
            "message": f"the {lost} before the transfer began; nothing moved and the instance stays on "
            f"{source}; {target} drops what it prepared",
            "handoff": {"outcome": "Failed"},
        }
    if status.get("step") == "RollbackTarget":
        outcome = (status.get("handoff") or {}).get("outcome", "Failed")
        message = f"{status.get('message', '')}; the {lost}, so what it prepared may stay there"
    else:
        outcome = "Failed"
        message = (
            f"the {lost}; nothing moved and the instance stays on {source}. "
            "Create a new Migration once the node is back, or choose another target"
        )
    return {"phase": outcome, "step": "Done", "message": message, "completionTime": now()}


@dataclasses.dataclass
class _Renewal:
    renew_time: datetime.datetime | None
    duration: float
    seen: float  # time.monotonic() when the controller saw this renewal


class NodeHealth:
    """Which nodes are unreachable, from the Lease renewals the controller saw, and what it says then."""

    def __init__(
        self,
        custom: kubernetes.client.CustomObjectsApi,
        core: kubernetes.client.CoreV1Api,
        clock: Callable[[], float] = time.monotonic,
        known: Callable[[], Collection[str]] | None = None,
    ) -> None:
        """``known()``: the ComputeNodes that exist; a Lease left by a removed node is not judged."""
        self.custom = custom
        self.core = core
        self.clock = clock
        self.known = known
        self._lock = threading.Lock()
        self._renewals: dict[str, _Renewal] = {}
        self._marked: dict[str, float] = {}  # node -> when its objects were last marked Unknown

    def renewed(self, node: str, renew_time: datetime.datetime | None, duration: float) -> bool:
        """Record a Lease as the watch brought it (a renewal counts from when it is first seen); whether
        the node is new to the controller."""
        with self._lock:
            known = self._renewals.get(node)
            if known is None or known.renew_time != renew_time:
                self._renewals[node] = _Renewal(renew_time, duration, self.clock())
            return known is None

    def forget(self, node: str) -> None:
        """The Lease is gone (the node was removed): nothing to judge any more."""
        with self._lock:
            self._renewals.pop(node, None)
            self._marked.pop(node, None)

    def unreachable_for(self) -> dict[str, float]:
        """Seconds since each unreachable node's Lease expired (reachable nodes are not listed)."""
        now = self.clock()
        known = self.known() if self.known else None
        with self._lock:
            return {
                node: now - renewal.seen - renewal.duration
                for node, renewal in self._renewals.items()
                if now - renewal.seen > renewal.duration and (known is None or node in known)
            }

    def check(self) -> None:
        """One pass: mark what became unreachable (and again every REMARK_INTERVAL while it stays so)."""
        down = self.unreachable_for()
        now = self.clock()
        with self._lock:
            for node in list(self._marked):
                if node not in down:
                    del self._marked[node]
                    log.info("the agent of %s renews its Lease again; it reports the truth itself", node)
            due = [n for n in down if now - self._marked.get(n, -REMARK_INTERVAL) >= REMARK_INTERVAL]
        for node in due:
            try:
                self._mark(node)
            except Exception as exc:  # the apiserver is away: the next pass tries again
                log.warning("cannot mark node %s unreachable: %s", node, exc)
                continue
            with self._lock:
                if node in self._renewals:
                    self._marked[node] = now

    def end_stuck_migrations(self) -> None:
        """Migrations whose turn belongs to a node unreachable past MIGRATION_GRACE end, where that is
        safe (``abandoned``), so their slots are free again; each write is guarded."""
        down = self.unreachable_for()
        if not any(seconds >= MIGRATION_GRACE for seconds in down.values()):
            return
        writer = StatusWriter(self.custom, MIGRATIONS)
        for body in typed(self.custom.list_cluster_custom_object(GROUP, VERSION, MIGRATIONS))["items"]:
            status = body.get("status") or {}
            patch = abandoned(body, down) if status.get("step") and not is_final(status) else None
            if patch is None or writer.write(body, patch, guard=True) is None:
                continue
            log.warning("migration %s: %s", body["metadata"]["name"], patch["message"])
            if patch.get("phase") == "Failed":
                try:
                    post_event(self.core, body, "MigrationFailed", patch["message"], "kubenova-controller")
                except kubernetes.client.ApiException as exc:
                    log.warning("cannot post the MigrationFailed event: %s", exc.reason)

    def _mark(self, node: str) -> None:
        first = node not in self._marked  # Events only then: an agent that answers back must not loop them
        if first:
            log.warning(
                "the agent of %s stopped renewing its Lease; its node and instances are Unknown", node
            )
        try:
            body = typed(self.custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, node))
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return
            raise
        _say_unknown(
            StatusWriter(self.custom, COMPUTENODES),
            self.core if first else None,
            body,
            f"the agent of {node} stopped renewing its Lease; what runs there is unknown until it is back. "
            "Its instances are not restarted elsewhere unless the node is fenced (spec.fenced; "
            "see docs/operations.md)",
        )
        listed = typed(
            self.custom.list_cluster_custom_object(
                GROUP, VERSION, VIRTUALINSTANCES, label_selector=f"{NODE_LABEL}={node}"
            )
        )
        writer = StatusWriter(self.custom, VIRTUALINSTANCES)
        for instance in listed["items"]:
            if instance["metadata"].get("deletionTimestamp"):
                continue
            _say_unknown(
                writer,
                self.core if first else None,
                instance,
                f"its node {node} is unreachable (its agent stopped renewing its Lease); the guest may "
                "still run there. It is restarted elsewhere only if the node is fenced",
            )


def _say_unknown(
    writer: StatusWriter,
    core: kubernetes.client.CoreV1Api | None,
    body: dict[str, object],
    message: str,
) -> None:
    """Ready=Unknown once (guarded: a write the agent made meanwhile wins), with an Event when ``core``."""
    status = body.get("status") or {}
    assert isinstance(status, dict)
    ready = condition(status, "Ready") or {}
    if (ready.get("status"), ready.get("reason")) == ("Unknown", REASON):
        return
    patch: dict[str, object] = {}
    set_condition(patch, status, "Ready", "Unknown", REASON, message)
    if writer.write(body, patch, guard=True) is None or core is None:
        return  # changed meanwhile (its agent wrote?) or gone: the next pass looks again
    try:
        post_event(core, body, REASON, message, "kubenova-controller")
    except kubernetes.client.ApiException as exc:
        log.warning("cannot post the NodeUnreachable event: %s", exc.reason)
