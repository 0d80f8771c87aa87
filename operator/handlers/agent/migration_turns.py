"""Whose turn a Migration's step is, and when an agent must leave the instance it moves alone.

Pure: read by the migration steps (``owner``) and by the instance reconciler (``holds``,
``bound_elsewhere``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kubenova.handlers.agent.convergence import POST_COPY
from kubenova.handlers.shared import NODE_LABEL, cancelled, is_final

#: Which side does each step; AwaitConfirmation belongs to the target for a revert, else the source.
OWNERS = {
    ("Live", "PrepareTarget"): "target",
    ("Live", "Transfer"): "source",
    ("Live", "Transferring"): "source",
    ("Live", "FinishTarget"): "target",
    ("Live", "RollbackTarget"): "target",
    ("Cold", "PowerOffSource"): "source",
    ("Cold", "FinishTarget"): "target",
    ("Cold", "RevertTarget"): "target",
    ("Cold", "RevertSource"): "source",
}


def owner(body: Mapping[str, Any]) -> str | None:
    """ "source" or "target": the side whose turn it is, None when nobody's (not scheduled, or done)."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    step = status.get("step")
    if step == "AwaitConfirmation":
        if spec.get("decision") == "Revert" or cancelled(body):
            return "target"
        return "source"
    return OWNERS.get((spec.get("type", ""), step or ""))


def holds(migrations: Iterable[Mapping[str, Any]], instance_uid: str, node: str) -> str | None:
    """Why the instance's domain must be left alone on ``node`` now, or None.

    "active": a migration of it is between steps (AwaitConfirmation excepted: the instance runs
    on the target then, and that agent looks after it as usual). "awaiting": a resize awaits its
    decision and ``node`` is its source, whose stopped copy stays as it is: a look at a copy of the
    instance still bound here (the label's change not yet seen) would redefine it with the spec's
    flavor and start it, a second copy of a guest that runs on the target. "moved": its newest migration
    took it away from this node; the watch will drop the object soon. "lost": a live transfer failed
    after its switch to post-copy, so neither node holds the whole guest; both halves are left to a
    person until that Migration is deleted.
    """
    mine = [b for b in list(migrations) if (b.get("status") or {}).get("instanceUID") == instance_uid]
    if not mine:
        return None
    for body in mine:
        status = body.get("status") or {}
        if not is_final(status):
            if status.get("step") != "AwaitConfirmation":
                return "active"
            if status.get("sourceNode") == node:
                return "awaiting"
        if status.get("phase") == "Failed" and (status.get("progress") or {}).get("mode") == POST_COPY:
            return "lost"
    newest = max(mine, key=lambda b: (b["metadata"].get("creationTimestamp", ""), b["metadata"]["name"]))
    status = newest.get("status") or {}
    if status.get("phase") == "Succeeded" and status.get("sourceNode") == node:
        return "moved"
    return None


def bound_elsewhere(
    body: Mapping[str, Any], migrations: Iterable[Mapping[str, Any]], node: str
) -> str | None:
    """Why ``node`` must not create the instance's domain, or None when it may: it never ran, it last
    ran on ``node``, or a Succeeded Migration moved it there.

    The label that binds an instance is kubenova's (admission refuses it to users), but a cluster
    admin can still change it, and the node status names may still run the guest: starting it on
    ``node`` too would run one instance twice.
    """
    uid, where = body["metadata"]["uid"], (body.get("status") or {}).get("node")
    if not where or where == node:
        return None
    for migration in migrations:
        status = migration.get("status") or {}
        if (status.get("instanceUID"), status.get("targetNode"), status.get("phase")) == (
            uid,
            node,
            "Succeeded",
        ):
            return None
    return (
        f"status.node says this instance runs on {where}, and no Migration moved it to {node}: a "
        f"changed {NODE_LABEL} label does not move a running guest, so it is not started here too. "
        f"Set the label back to {where} or create a Migration; if {where} is gone for good, a cluster "
        "admin clears status.node to start it here"
    )
