"""Migrations, agent side: each node does the steps of a Migration that are its own.

Once the controller has chosen the target it writes ``status.step``. From then on the two
agents hand the migration to each other through the Migration's status, one step at a time,
and every step belongs to exactly one node (``owner``), so no two processes ever act on the
same move. A step writes its successor only after its driver call returned, so an agent
restarted mid-step finds its own step again; the one step that must not run twice (the
live transfer) is marked ``Transferring`` before it starts.

While a migration of an instance is under way its agents leave the domain alone: the
instance side asks ``holds`` before converging, so a resync never "repairs" a domain that is
leaving or arriving.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import kubernetes
import urllib3

from kubenova import faults
from kubenova.driver.base import (
    CPUIncompatible,
    CpuInfo,
    DriverError,
    InstanceNotFound,
    MigrationProgress,
)
from kubenova.handlers.agent.cache import ObjectCache
from kubenova.handlers.shared import (
    COMPUTENODES,
    GROUP,
    MIGRATIONS,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    StatusWriter,
    cancelled,
    flavor_of,
    is_final,
    now,
    typed,
)

if TYPE_CHECKING:  # the instance side reads this module's holds
    from kubenova.handlers.agent.instances import InstanceAgent

log = logging.getLogger(__name__)
#: Progress of a live transfer is written at most this often.
PROGRESS_INTERVAL = 2.0
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


class Gone(Exception):
    """The instance this migration moves was deleted or replaced."""


def holds(migrations: Iterable[Mapping[str, Any]], instance_uid: str, node: str) -> str | None:
    """Why the instance's domain must be left alone on ``node`` now, or None.

    "active": a migration of it is between steps (AwaitConfirmation excepted: the instance runs
    on the target then, and that agent looks after it as usual). "moved": its newest migration
    took it away from this node; the watch will drop the object soon.
    """
    mine = [b for b in list(migrations) if (b.get("status") or {}).get("instanceUID") == instance_uid]
    if not mine:
        return None
    for body in mine:
        status = body.get("status") or {}
        if not is_final(status) and status.get("step") != "AwaitConfirmation":
            return "active"
    newest = max(mine, key=lambda b: (b["metadata"].get("creationTimestamp", ""), b["metadata"]["name"]))
    status = newest.get("status") or {}
    if status.get("phase") == "Succeeded" and status.get("sourceNode") == node:
        return "moved"
    return None


class MigrationAgent:
    """The Migrations this node is the source or the target of ("migration" keys of the agent's queue)."""

    def __init__(self, instances: InstanceAgent, cache: ObjectCache) -> None:
        self.instances = instances
        self.cache = cache
        self.status = StatusWriter(instances.custom, MIGRATIONS)
        self.instance_status = StatusWriter(instances.custom, VIRTUALINSTANCES)
        self.node = instances.node
        self.driver = instances.driver
        self.custom = instances.custom
        self._transfers: dict[str, str] = {}  # migration uid -> instance uid, while its transfer runs here
        self._aborted: set[str] = set()
        self._settled: set[str] = set()  # final migrations whose instance was looked at again here
        cache.on_forget(self._forget)

    # --- the loop ------------------------------------------------------------------------

    def notice(self, uid: str) -> None:
        """A watch event: only a cancel is acted on here (at once); the steps run on the agent's queue.

        A step can take minutes (a transfer); run inside kopf's handler it would hold back kopf's
        next event for the same Migration, which may be the cancel.
        """
        body = self.cache.objects.get(uid)
        if body is None:
            return
        if uid in self._transfers and cancelled(body) and uid not in self._aborted:
            self._aborted.add(uid)
            try:
                self.driver.abort_live_migration(self._transfers[uid])
            except DriverError as exc:
                log.warning("aborting the migration %s failed: %s", body["metadata"]["name"], exc)
            return
        self.cache.schedule(uid, 0.0)

    def handle(self, uid: str) -> None:
        body = self.cache.objects.get(uid)
        if body is None or uid in self._transfers:
            return
        if is_final(body.get("status") or {}):
            instance_uid = body["status"].get("instanceUID")
            if uid not in self._settled and instance_uid:  # the other node ended it: this side of it resumes
                self._settled.add(uid)
                self.instances.cache.schedule(instance_uid, 0.0)
            return
        try:
            self._step(body)
            self.cache.succeeded(uid)
        except (DriverError, kubernetes.client.ApiException, urllib3.exceptions.HTTPError) as exc:
            log.warning("migration %s: %s; trying again", uid, exc)
            self.cache.retry_later(uid)
        except Exception:  # a bug must not stop the retries
            log.exception("migration %s failed", uid)
            self.cache.retry_later(uid)

    def _forget(self, uid: str) -> None:
        self._aborted.discard(uid)
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
        try:
            getattr(self, f"_{kind.lower()}_{step.lower()}")(body)
        except Gone as exc:
            self._finish(body, "Failed", str(exc))

    # --- status --------------------------------------------------------------------------

    def _write(self, body: dict[str, Any], patch: dict[str, Any]) -> None:
        fresh = self.status.write(body, patch)
        if fresh is None or fresh is body:  # gone (its watch event drops it here), or nothing new
            return
        self.cache.seen("MODIFIED", fresh)
        body.clear()
        body.update(fresh)

    def _finish(self, body: dict[str, Any], phase: str, message: str, **extra: Any) -> None:
        """The last write of a migration; its instance is looked at again on this node."""
        faults.point(f"migration.{body['status']['step']}")
        self._write(
            body, {"phase": phase, "step": "Done", "message": message, "completionTime": now(), **extra}
        )
        self.instances.events.post(
            body,
            phase if phase != "Succeeded" else "Migrated",
            message,
            "Normal" if phase in ("Succeeded", "Reverted") else "Warning",
        )
        self.instances.cache.schedule(body["status"]["instanceUID"], 0.0)

    def _hand_over(self, body: dict[str, Any], step: str, message: str, **extra: Any) -> None:
        faults.point(f"migration.{body['status']['step']}")  # this step's work is done, not yet said
        self._write(body, {"step": step, "message": message, **extra})

    # --- the instance --------------------------------------------------------------------

    def _instance(self, body: Mapping[str, Any]) -> dict[str, Any]:
        meta, status = body["metadata"], body.get("status") or {}
        name = body["spec"]["instanceRef"]["name"]
        try:
            instance = typed(
                self.custom.get_namespaced_custom_object(
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

    def _move_instance(self, instance: Mapping[str, Any], node: str, flavor: dict[str, int] | None) -> None:
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
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            meta["namespace"],
            VIRTUALINSTANCES,
            meta["name"],
            {"metadata": {"labels": {NODE_LABEL: node}}},
        )

    # --- live ----------------------------------------------------------------------------

    def _live_preparetarget(self, body: dict[str, Any]) -> None:
        status = body["status"]
        source = status["sourceNode"]
        if cancelled(body):
            self._finish(body, "Cancelled", f"cancelled before the transfer; the instance stays on {source}")
            return
        instance = self._instance(body)
        cpu = (
            typed(self.custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, source)).get("status")
            or {}
        ).get("cpuInfo")
        try:
            if cpu:
                self.driver.compare_cpu(CpuInfo(**{**cpu, "features": tuple(cpu.get("features") or ())}))
            definition = self.driver.pre_live_migration(
                self.instances.driver_spec(instance, flavor_of(instance))
            )
        except CPUIncompatible as exc:
            self._finish(
                body,
                "Failed",
                f"{self.node} cannot run a guest started on {source}: {exc}; choose "
                "another spec.targetNode, or stop the instance and use a Cold migration",
            )
            return
        except DriverError as exc:
            self._finish(
                body,
                "Failed",
                f"{self.node} could not prepare for the instance: {exc}; it stays running on {source}",
            )
            return
        self._hand_over(
            body,
            "Transfer",
            f"{self.node} is prepared; {source} transfers the instance",
            phase="Migrating",
            handoff={"definition": definition},
        )

    def _live_transfer(self, body: dict[str, Any]) -> None:
        status, spec = body["status"], body["spec"]
        uid, instance_uid = body["metadata"]["uid"], status["instanceUID"]
        if cancelled(body):
            self._hand_over(
                body,
                "RollbackTarget",
                f"cancelled before the transfer; the instance stays on {self.node}",
                handoff={"outcome": "Cancelled"},
            )
            return
        self._hand_over(body, "Transferring", f"transferring from {self.node} to {status['targetNode']}")
        last = [0.0]

        def progress(step: MigrationProgress) -> None:
            if time.monotonic() - last[0] < PROGRESS_INTERVAL:
                return
            last[0] = time.monotonic()
            done = step.data_processed * 100 // step.data_total if step.data_total else 0
            try:
                self._write(
                    body,
                    {
                        "progress": {
                            "percent": min(99, done),
                            "dataTotalBytes": step.data_total,
                            "dataProcessedBytes": step.data_processed,
                            "dataRemainingBytes": step.data_remaining,
                            "iteration": step.iteration,
                            "expectedDowntimeMs": step.expected_downtime_ms,
                        }
                    },
                )
            except kubernetes.client.ApiException as exc:  # progress is best effort; the transfer goes on
                log.warning("cannot write the progress of %s: %s", body["metadata"]["name"], exc.reason)
            if cancelled(self.cache.objects.get(uid, body)) and uid not in self._aborted:
                self._aborted.add(uid)
                self.driver.abort_live_migration(instance_uid)

        self._transfers[uid] = instance_uid
        try:
            self.driver.live_migration(
                instance_uid,
                status["handoff"]["targetURI"],
                status["handoff"]["definition"],
                progress,
                max_bandwidth_mib=spec.get("bandwidthMiBps"),
            )
        except DriverError as exc:
            if uid in self._aborted:
                outcome, message = (
                    "Cancelled",
                    f"cancelled during the transfer; the instance keeps running on {self.node}",
                )
            else:
                outcome, message = (
                    "Failed",
                    f"the transfer failed: {exc}; the instance keeps running on {self.node}",
                )
            self._hand_over(body, "RollbackTarget", message, handoff={"outcome": outcome})
            return
        finally:
            self._transfers.pop(uid, None)
        self._hand_over(
            body,
            "FinishTarget",
            f"transferred; {status['targetNode']} takes over",
            progress={**(status.get("progress") or {}), "percent": 100, "dataRemainingBytes": 0},
        )

    def _live_transferring(self, body: dict[str, Any]) -> None:
        """Found on start-up: this agent died during the transfer, so whether it finished is unknown."""
        instance_uid = body["status"]["instanceUID"]
        if self.driver.instance_exists(instance_uid):
            try:
                self.driver.abort_live_migration(instance_uid)
            except DriverError:
                pass  # no job was running any more
            self._hand_over(
                body,
                "RollbackTarget",
                f"the agent on {self.node} restarted during the transfer; the "
                f"instance stays on {self.node}; create a new Migration to move it",
                handoff={"outcome": "Failed"},
            )
        else:
            self._hand_over(body, "FinishTarget", "the transfer completed while the source's agent restarted")

    def _live_finishtarget(self, body: dict[str, Any]) -> None:
        status = body["status"]
        instance = self._instance(body)
        try:
            outcome = self.driver.post_live_migration_at_destination(status["instanceUID"])
        except InstanceNotFound:
            self._finish(
                body,
                "Failed",
                f"the instance did not arrive on {self.node}; check the source "
                f"{status['sourceNode']} and the libvirt logs",
            )
            return
        self._move_instance(instance, self.node, None)
        figures = {
            key: value
            for key, value in (("elapsedMs", outcome.elapsed_ms), ("downtimeMs", outcome.downtime_ms))
            if value is not None
        }
        said = ", ".join(f"{k[:-2]} {v} ms" for k, v in figures.items())
        self._finish(
            body,
            "Succeeded",
            f"moved from {status['sourceNode']} to {self.node}" + (f" ({said})" if said else ""),
            progress={**(status.get("progress") or {}), **figures},
        )

    def _live_rollbacktarget(self, body: dict[str, Any]) -> None:
        status = body["status"]
        self.driver.rollback_live_migration_at_destination(status["instanceUID"])
        self._finish(body, status["handoff"].get("outcome", "Failed"), status.get("message", ""))

    # --- cold ----------------------------------------------------------------------------

    def _cold_poweroffsource(self, body: dict[str, Any]) -> None:
        status = body["status"]
        if cancelled(body):
            self._finish(body, "Cancelled", f"cancelled before it started; the instance stays on {self.node}")
            return
        instance = self._instance(body)
        disks = self.driver.migrate_disk_and_power_off(status["instanceUID"], status["handoff"]["targetURI"])
        self._hand_over(
            body,
            "FinishTarget",
            f"stopped on {self.node}; {status['targetNode']} copies the disks",
            phase="Migrating",
            handoff={"disks": disks, "flavor": flavor_of(instance)},
        )

    def _cold_finishtarget(self, body: dict[str, Any]) -> None:
        status, spec = body["status"], body["spec"]
        source, handoff = status["sourceNode"], status["handoff"]
        if cancelled(body):
            self._hand_over(
                body,
                "RevertSource",
                f"cancelled; {source} starts the instance again",
                handoff={"outcome": "Cancelled"},
            )
            return
        instance = self._instance(body)
        flavor = dict(spec.get("flavor") or handoff["flavor"])
        power_on = (instance.get("spec") or {}).get("powerState", "Running") != "Stopped"
        if not self.driver.instance_exists(status["instanceUID"]):
            try:
                self.driver.finish_migration(
                    self.instances.driver_spec(instance, flavor),
                    list(handoff.get("disks") or []),
                    handoff["sourceURI"],
                    power_on,
                )
            except DriverError as exc:
                self.driver.destroy(status["instanceUID"])
                self._hand_over(
                    body,
                    "RevertSource",
                    f"{self.node} could not start the instance: {exc}; {source} starts the original again",
                    handoff={"outcome": "Failed"},
                )
                return
        self._move_instance(instance, self.node, flavor)
        confirmation = spec.get("confirmation") or {}
        size = f"{flavor['vcpus']} vCPU, {flavor['memoryMiB']} MiB"
        if confirmation.get("policy", "Auto") == "Auto":
            seconds = int(confirmation.get("autoConfirmSeconds", 300))
            deadline = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
            when = deadline.strftime("%Y-%m-%dT%H:%M:%SZ")
            self._hand_over(
                body,
                "AwaitConfirmation",
                f"running on {self.node} ({size}); confirms itself at {when} "
                "unless spec.decision says Revert first",
                phase="AwaitingConfirmation",
                handoff={"confirmAfter": when},
            )
        else:
            self._hand_over(
                body,
                "AwaitConfirmation",
                f"running on {self.node} ({size}); set spec.decision to Confirm (frees {source}) or Revert",
                phase="AwaitingConfirmation",
            )

    def _cold_awaitconfirmation(self, body: dict[str, Any]) -> None:
        status, spec = body["status"], body["spec"]
        if spec.get("decision") == "Revert" or cancelled(body):  # this is the target
            # First a step of its own: while it runs, this node's instance side keeps its hands off.
            self._hand_over(
                body,
                "RevertTarget",
                f"reverting; {self.node} deletes its copy",
                handoff={"outcome": "Reverted" if spec.get("decision") == "Revert" else "Cancelled"},
            )
            self._cold_reverttarget(body)
            return
        deadline = status["handoff"].get("confirmAfter")
        if spec.get("decision") != "Confirm":
            if not deadline:
                return  # Manual: waits for spec.decision
            left = (
                datetime.datetime.fromisoformat(deadline.replace("Z", "+00:00"))
                - datetime.datetime.now(datetime.UTC)
            ).total_seconds()
            if left > 0:
                self.cache.schedule(body["metadata"]["uid"], left + 0.1)
                return
        self.driver.confirm_migration(status["instanceUID"])
        how = "confirmed" if spec.get("decision") == "Confirm" else "confirmed automatically"
        self._finish(
            body,
            "Succeeded",
            f"{how}: the instance runs on {status['targetNode']}; its copy on {self.node} is deleted",
        )

    def _cold_reverttarget(self, body: dict[str, Any]) -> None:
        status = body["status"]
        instance = self._instance(body)
        self.driver.destroy(status["instanceUID"])
        self._move_instance(instance, status["sourceNode"], status["handoff"]["flavor"])
        self._hand_over(body, "RevertSource", f"reverting; {status['sourceNode']} starts the original again")

    def _cold_revertsource(self, body: dict[str, Any]) -> None:
        status = body["status"]
        instance = self._instance(body)
        power_on = (instance.get("spec") or {}).get("powerState", "Running") != "Stopped"
        self.driver.finish_revert_migration(status["instanceUID"], power_on)
        outcome = status["handoff"].get("outcome", "Reverted")
        message = (
            status.get("message", "")
            if outcome != "Reverted"
            else f"reverted: the instance runs on {self.node} again with its original flavor"
        )
        self._finish(body, outcome, message)
