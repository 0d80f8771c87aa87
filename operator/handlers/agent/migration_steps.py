"""Migrations, agent side: each node does the steps of a Migration that are its own.

Once the controller has chosen the target it writes ``status.step``. From then on the two
agents hand the migration to each other through the Migration's status, one step at a time,
and every step belongs to exactly one node (``migration_turns.owner``), so no two processes ever
act on the same move. A step writes its successor only after its driver call returned, so an agent
restarted mid-step finds its own step again; the one step that must not run twice (the
live transfer) is marked ``Transferring`` before it starts.

While a migration of an instance is under way its agents leave the domain alone: the
instance side asks ``migration_turns.holds`` before converging, so a resync never "repairs" a
domain that is leaving or arriving.

The steps themselves are in live_migration_steps.py and cold_migration_steps.py; what they write, in
migration_handover.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes
import urllib3

from kubenova.driver.base import ComputeDriver, Convergence, DriverError, InstanceSpec
from kubenova.handlers.agent.cache import ObjectCache
from kubenova.handlers.agent.cold_migration_steps import ColdSteps
from kubenova.handlers.agent.events import EventPoster
from kubenova.handlers.agent.live_migration_steps import DEFAULT_TIMEOUT_PER_GIB, LiveSteps
from kubenova.handlers.agent.migration_handover import Gone, Handover, Superseded
from kubenova.handlers.agent.migration_turns import owner
from kubenova.handlers.shared import WritesStatus, is_final

log = logging.getLogger(__name__)


class MigrationAgent:
    """The Migrations this node is the source or the target of ("migration" keys of the agent's queue)."""

    def __init__(
        self,
        node: str,
        driver: ComputeDriver,
        objects: kubernetes.client.CustomObjectsApi,
        status: WritesStatus,
        instance_status: WritesStatus,
        events: EventPoster,
        cache: ObjectCache,
        instance_cache: ObjectCache,
        spec_for: Callable[[Mapping[str, Any], Mapping[str, Any]], InstanceSpec],
        timeout_per_gib: float = DEFAULT_TIMEOUT_PER_GIB,
        convergence: Convergence | None = None,
    ) -> None:
        """``objects`` reads and labels the instances moved, ``status`` writes Migrations, ``instance_status``
        the instances'; ``spec_for(instance, flavor)`` is the driver's view of an instance, Secrets read;
        ``timeout_per_gib`` a live transfer's deadline per GiB of guest memory and ``convergence`` how it
        may force its end, unless its Migration says otherwise."""
        self.node = node
        self.driver = driver
        self.cache = cache
        self.instance_cache = instance_cache
        handover = Handover(objects, status, instance_status, events, cache, instance_cache)
        self.live = LiveSteps(node, driver, handover, spec_for, objects, timeout_per_gib, convergence)
        self.cold = ColdSteps(node, driver, handover, spec_for)
        self.handover = handover
        self._settled: set[str] = set()  # final migrations whose instance was looked at again here
        cache.on_forget(self._forget)

    def notice(self, uid: str) -> None:
        """A watch event: only a cancel is acted on here (at once); the steps run on the agent's queue.

        A step can take minutes (a transfer); run inside kopf's handler it would hold back kopf's
        next event for the same Migration, which may be the cancel.
        """
        body = self.cache.objects.get(uid)
        if body is None:
            return
        if self.live.abort(uid, body):
            return
        self.cache.schedule(uid, 0.0)

    def instance_deleted(self, instance_uid: str) -> None:
        """A user deleted the instance: its transfer running here stops now, not at the next progress
        report (a delete never waits for a transfer)."""
        for uid, body in list(self.cache.objects.items()):
            if (body.get("status") or {}).get("instanceUID") == instance_uid:
                self.live.abort(uid, body)

    def handle(self, uid: str) -> None:
        body = self.cache.objects.get(uid)
        if body is None or self.live.running(uid):
            return
        if is_final(body.get("status") or {}):
            instance_uid = body["status"].get("instanceUID")
            if uid not in self._settled and instance_uid:  # the other node ended it: this side of it resumes
                self._settled.add(uid)
                self._drop_preparation(body)
                self.instance_cache.schedule(instance_uid, 0.0)
            return
        try:
            self._step(body)
            self.cache.succeeded(uid)
        except Superseded as exc:  # the watch brings the newer version; its step decides anew
            log.info("%s; its step runs again on the newest copy", exc)
            self.cache.retry_later(uid)
        except (DriverError, kubernetes.client.ApiException, urllib3.exceptions.HTTPError) as exc:
            log.warning("migration %s: %s; trying again", uid, exc)
            self.cache.retry_later(uid)
        except Exception:  # a bug must not stop the retries
            log.exception("migration %s failed", uid)
            self.cache.retry_later(uid)

    def _drop_preparation(self, body: dict[str, Any]) -> None:
        """A live Migration that ended without moving the guest here, possibly decided without this node
        (the controller ends one whose target stopped answering before it said it prepared): what
        pre_live_migration made here goes, unless a domain of the instance is here (it runs here for
        another reason), the transfer failed in post-copy (both halves are kept), or a newer migration of
        the instance comes here (a node that was away sees the old one end only then: its files are the
        new one's)."""
        status = body["status"]
        uid = status["instanceUID"]
        if (
            body["spec"].get("type") != "Live"
            or status.get("targetNode") != self.node
            or status.get("phase") == "Succeeded"
            or (status.get("progress") or {}).get("mode") == "PostCopy"
            or any(
                (other.get("status") or {}).get("instanceUID") == uid and not is_final(other["status"])
                for other in list(self.cache.objects.values())
            )
        ):
            return
        try:
            if not self.driver.instance_exists(uid):
                self.driver.rollback_live_migration_at_destination(uid)
        except DriverError as exc:
            log.warning("cannot drop what was prepared here for %s: %s", uid, exc)

    def _forget(self, uid: str) -> None:
        self.live.forget(uid)
        self._settled.discard(uid)

    def _step(self, body: dict[str, Any]) -> None:
        status = body.get("status") or {}
        role = {status.get("sourceNode"): "source", status.get("targetNode"): "target"}.get(self.node)
        if role is None or is_final(status) or owner(body) != role:
            return
        kind, step = body["spec"]["type"], status["step"]
        log.info(
            "migration %s/%s: %s (%s)", body["metadata"]["namespace"], body["metadata"]["name"], step, role
        )
        steps = self.live.steps if kind == "Live" else self.cold.steps
        try:
            steps[step](body)
        except Gone as exc:
            self.handover.finish(body, "Failed", str(exc))
