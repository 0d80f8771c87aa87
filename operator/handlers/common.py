"""Names and the one condition helper shared by the controller and the agent."""
from __future__ import annotations

import datetime
from collections.abc import Mapping, MutableMapping
from typing import Any

GROUP = "compute.kubenova.io"
VERSION = "v1alpha1"
VIRTUALINSTANCES = "virtualinstances"
COMPUTENODES = "computenodes"
#: The binding label: agents watch only the objects carrying their own node name.
NODE_LABEL = f"{GROUP}/node"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(status_patch: MutableMapping[str, Any], status: Mapping[str, Any], type_: str,
                  value: bool, reason: str, message: str, generation: int | None = None) -> None:
    """Write one condition into the patch, keeping the others and the transition time if unchanged.

    Conditions are patched as a whole list (merge patch), so the list starts from what the
    status holds now, or from what this patch already wrote.
    """
    current = status_patch.get("conditions", status.get("conditions") or [])
    wanted = "True" if value else "False"
    conditions = []
    found = False
    for cond in current:
        if cond.get("type") == type_:
            found = True
            changed = cond.get("status") != wanted
            cond = {**cond, "status": wanted, "reason": reason, "message": message}
            if changed:
                cond["lastTransitionTime"] = now()
        conditions.append(dict(cond))
    if not found:
        conditions.append({"type": type_, "status": wanted, "reason": reason, "message": message,
                           "lastTransitionTime": now()})
    if generation is not None:
        for cond in conditions:
            if cond["type"] == type_:
                cond["observedGeneration"] = generation
    status_patch["conditions"] = conditions


def condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return cond  # type: ignore[no-any-return]
    return None
