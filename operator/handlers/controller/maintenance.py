"""Node maintenance, controller side: empty a node whose spec.maintenance is set, one Migration per
instance, and say how far it got in the ComputeNode's status.maintenance.

Part of the migration planner's pass (migration_planner.py), which reads the Migrations fresh and hands
them over: an instance is never evacuated twice, and the Migrations it makes are planned like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
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
    cancelled,
    is_final,
    now,
    typed,
)

log = logging.getLogger(__name__)
#: On the Migrations the controller creates to empty a node in maintenance; the value is the node.
EVACUATION_LABEL = f"{GROUP}/evacuating"
#: How many Migrations maintenance makes for one instance before it reports that the instance cannot move:
#: a transfer that missed its deadline while the guest was busy, or a target that failed to prepare, is
#: usually gone on the next try (KubeVirt retries evacuations too), and a drain must not hang on one.
EVACUATION_ATTEMPTS = 3


def scheduled(body: Mapping[str, Any]) -> bool:
    """Whether the planner has started the Migration (it names a step)."""
    return bool((body.get("status") or {}).get("step"))


def created(body: Mapping[str, Any]) -> str:
    """When the Migration was created, as the apiserver wrote it: RFC 3339 in UTC sorts as text."""
    return str(body["metadata"].get("creationTimestamp", ""))


class Maintenance:
    """The maintenance part of one planning pass, node by node."""

    def __init__(self, custom: kubernetes.client.CustomObjectsApi) -> None:
        self.custom = custom
        self.node_status = StatusWriter(custom, COMPUTENODES)

    def run(self, node: Mapping[str, Any], migrations: list[dict[str, Any]]) -> None:
        name = node["metadata"]["name"]
        wanted = bool((node.get("spec") or {}).get("maintenance"))
        current = (node.get("status") or {}).get("maintenance") or {}
        if not wanted and not current:
            return
        evacuations = sorted(
            (b for b in migrations if (b["metadata"].get("labels") or {}).get(EVACUATION_LABEL) == name),
            key=created,
        )
        if not wanted:
            cancelled_now = 0
            for body in evacuations:
                if not scheduled(body) and not is_final(body.get("status") or {}) and not cancelled(body):
                    meta = body["metadata"]
                    self.custom.patch_namespaced_custom_object(
                        GROUP,
                        VERSION,
                        meta["namespace"],
                        MIGRATIONS,
                        meta["name"],
                        {"spec": {"cancel": True}},
                    )
                    cancelled_now += 1
            if current.get("state") == "Draining":
                self._status(
                    name,
                    current,
                    {
                        **current,
                        "state": "Stopped",
                        "message": "maintenance was turned off before the node was empty; "
                        f"{cancelled_now} migrations that had not started were cancelled, "
                        "the running ones finish",
                    },
                )
            elif current.get("state") == "Drained":
                self._status(name, current, None)
            return
        draining = current.get("state") in ("Draining", "Drained")
        since = str(current.get("startTime") or now()) if draining else now()
        instances = typed(
            self.custom.list_cluster_custom_object(
                GROUP, VERSION, VIRTUALINSTANCES, label_selector=f"{NODE_LABEL}={name}"
            )
        )["items"]
        mine = [b for b in evacuations if created(b) >= since]
        left = []
        for instance in instances:
            imeta = instance["metadata"]
            if imeta.get("deletionTimestamp"):
                continue
            tries = [
                b
                for b in mine
                if b["spec"]["instanceRef"]["name"] == imeta["name"]
                and b["metadata"]["namespace"] == imeta["namespace"]
            ]
            if any(
                not is_final(b.get("status") or {}) or (b.get("status") or {}).get("phase") == "Succeeded"
                for b in tries
            ):
                continue
            failed = [b for b in tries if b.get("status", {}).get("phase") == "Failed"]
            if len(failed) >= EVACUATION_ATTEMPTS:
                left.append(
                    f"{imeta['namespace']}/{imeta['name']} ({failed[-1]['status'].get('message', 'failed')})"
                )
            else:
                mine.append(self._evacuate(name, instance, len(tries) + 1))
        migrations_status = [
            {
                "instance": f"{b['metadata']['namespace']}/{b['spec']['instanceRef']['name']}",
                "migration": b["metadata"]["name"],
                "phase": (b.get("status") or {}).get("phase", "Pending"),
                "percent": ((b.get("status") or {}).get("progress") or {}).get("percent", 0),
            }
            for b in mine
        ]
        remaining = [i for i in instances if not i["metadata"].get("deletionTimestamp")]
        # Drained once nothing is bound here and every move has ended (an instance is rebound just before
        # its Migration says Succeeded).
        settled = all(is_final(b.get("status") or {}) for b in mine)
        state = "Drained" if not remaining and settled else "Draining"
        message = (
            f"no instance is left on {name}"
            if not remaining
            else f"{len(remaining)} instances are still on {name}"
            + (f"; these could not move: {'; '.join(left)}" if left else "")
        )
        self._status(
            name,
            current,
            {"state": state, "startTime": since, "message": message, "migrations": migrations_status},
        )

    def _evacuate(self, node: str, instance: Mapping[str, Any], attempt: int) -> dict[str, Any]:
        """Create the Migration that moves one instance off a node in maintenance (Live if it runs)."""
        imeta = instance["metadata"]
        running = (instance.get("status") or {}).get("powerState") in ("Running", "Paused")
        spec: dict[str, Any] = {"instanceRef": {"name": imeta["name"]}, "type": "Live" if running else "Cold"}
        if not running:  # nobody is there to confirm a move made for maintenance
            spec["confirmation"] = {"policy": "Auto", "autoConfirmSeconds": 0}
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Migration",
            "metadata": {
                "generateName": f"evacuate-{imeta['name'][:40]}-",
                "namespace": imeta["namespace"],
                "labels": {EVACUATION_LABEL: node},
            },
            "spec": spec,
        }
        made: dict[str, Any] = typed(
            self.custom.create_namespaced_custom_object(GROUP, VERSION, imeta["namespace"], MIGRATIONS, body)
        )
        log.info(
            "maintenance of %s: migration %s/%s for %s (attempt %d of %d)",
            node,
            imeta["namespace"],
            made["metadata"]["name"],
            imeta["name"],
            attempt,
            EVACUATION_ATTEMPTS,
        )
        return made

    def _status(self, name: str, current: Mapping[str, Any], wanted: Mapping[str, Any] | None) -> None:
        if dict(current) == (dict(wanted) if wanted else {}):
            return
        self.node_status.write(
            {"metadata": {"name": name}, "status": {"maintenance": dict(current)}}, {"maintenance": wanted}
        )
