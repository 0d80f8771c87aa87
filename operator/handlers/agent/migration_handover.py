"""How the migration steps say what they did: the Migration's status, the moved instance's binding.

A step hands the Migration over to the other node by writing its successor (``hand_over``), or ends it
(``finish``); the instance is read fresh for each step (``instance``) and moved by one status write
and one label patch (``move_instance``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kubernetes

from kubenova import faults
from kubenova.driver.base import DriverError
from kubenova.handlers.agent.cache import ObjectCache
from kubenova.handlers.agent.events import EventPoster
from kubenova.handlers.shared import (
    COMPUTENODES,
    GROUP,
    MIGRATION_TARGET_LABEL,
    MIGRATIONS,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    WritesStatus,
    flavor_of,
    now,
    read_fresh,
    typed,
)

log = logging.getLogger(__name__)


class Gone(Exception):
    """The instance this migration moves was deleted or replaced."""


class Superseded(Exception):
    """A step's write found the Migration changed since the step read it (the controller ended it while
    this agent was away, or a user cancelled): the step stops, and runs again on the newest copy."""


class Handover:
    """The writes of the migration steps; ``status`` writes Migrations, ``instance_status`` instances."""

    def __init__(
        self,
        objects: kubernetes.client.CustomObjectsApi,
        status: WritesStatus,
        instance_status: WritesStatus,
        events: EventPoster,
        cache: ObjectCache,
        instance_cache: ObjectCache,
    ) -> None:
        self.objects = objects
        self.status = status
        self.instance_status = instance_status
        self.events = events
        self.cache = cache
        self.instance_cache = instance_cache

    def write(self, body: dict[str, Any], patch: dict[str, Any], guard: bool = False) -> None:
        """Patch the Migration's status; its answer is the newest body. ``guard``: only if the Migration is
        still the version the step decided on (Superseded otherwise), as every step's hand-over is."""
        fresh = self.status.write(body, patch, guard=guard)
        if fresh is None and guard and self._only_spec_changed(body):
            fresh = self.status.write(body, patch, guard=guard)  # a user's cancel: the step said its outcome
        if fresh is None and guard:
            raise Superseded(f"migration {body['metadata']['name']} changed or went away meanwhile")
        if fresh is None or fresh is body:  # gone (its watch event drops it here), or nothing new
            return
        self.cache.written(fresh)
        body.clear()
        body.update(fresh)

    def _only_spec_changed(self, body: dict[str, Any]) -> bool:
        """After a refused guarded write: whether the Migration's status is still what the step read (a
        user changed its spec, a cancel say, which the step's outcome already accounts for); then ``body``
        takes the new version, for the write to be tried once more."""
        fresh = read_fresh(self.objects, MIGRATIONS, body["metadata"])
        if fresh is None or fresh.get("status") != body.get("status"):
            return False
        body.clear()
        body.update(fresh)
        return True

    def finish(self, body: dict[str, Any], phase: str, message: str, **extra: Any) -> None:
        """The last write of a migration; its instance is looked at again on this node."""
        faults.point(f"migration.{body['status']['step']}")
        self.write(
            body,
            {"phase": phase, "step": "Done", "message": message, "completionTime": now(), **extra},
            guard=True,
        )
        good = phase in ("Succeeded", "Reverted")
        meta = body["metadata"]  # the why of a failure in the node's log too, where CI's output shows it
        log.log(
            logging.INFO if good else logging.WARNING,
            "migration %s/%s: %s: %s",
            meta["namespace"],
            meta["name"],
            phase,
            message,
        )
        self.events.post(
            body,
            phase if phase != "Succeeded" else "Migrated",
            message,
            "Normal" if good else "Warning",
        )
        self.instance_cache.schedule(body["status"]["instanceUID"], 0.0)

    def hand_over(self, body: dict[str, Any], step: str, message: str, **extra: Any) -> None:
        """Name the next step (the other node's, or this one's own)."""
        faults.point(f"migration.{body['status']['step']}")  # this step's work is done, not yet said
        self.write(body, {"step": step, "message": message, **extra}, guard=True)

    def published_uri(self, node: str) -> str:
        """The migration URI ``node``'s own agent publishes in its ComputeNode (admission lets no other
        node write it), rather than the one the Migration's hand-off carries."""
        found = typed(self.objects.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, node))
        uri = (found.get("status") or {}).get("migrationURI")
        if not uri:
            raise DriverError(f"ComputeNode {node} publishes no migrationURI")
        return str(uri)

    def instance(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The instance the migration moves, read fresh; Gone when it was deleted or replaced."""
        meta, status = body["metadata"], body.get("status") or {}
        name = body["spec"]["instanceRef"]["name"]
        try:
            instance = typed(
                self.objects.get_namespaced_custom_object(
                    GROUP, VERSION, meta["namespace"], VIRTUALINSTANCES, name
                )
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                raise Gone(f"VirtualInstance {name!r} was deleted during the migration") from exc
            raise
        if instance["metadata"]["uid"] != status.get("instanceUID"):
            raise Gone(f"VirtualInstance {name!r} was deleted and created again during the migration")
        return dict(instance)

    def move_instance(self, instance: Mapping[str, Any], node: str, flavor: dict[str, int] | None) -> None:
        """Bind the instance to ``node`` (the agents' watches follow the label) and record its flavor.

        The status names the new node first, so that it never contradicts the Migration that says
        Succeeded, even before the new node's agent writes its own status.
        """
        meta = instance["metadata"]
        status: dict[str, Any] = {
            "node": node,
            "console": {"node": node, "logFile": f"{meta['uid']}/console.log"},
        }
        if flavor is not None:
            spec_flavor = flavor_of({"spec": instance["spec"]})
            status["resize"] = (
                {"flavor": flavor, "specFlavor": spec_flavor} if flavor != spec_flavor else None
            )
        self.instance_status.write(instance, status)
        self.objects.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            meta["namespace"],
            VIRTUALINSTANCES,
            meta["name"],
            {"metadata": {"labels": {NODE_LABEL: node, MIGRATION_TARGET_LABEL: None}}},
        )
