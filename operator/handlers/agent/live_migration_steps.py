"""The steps of a Live migration: prepare the target, transfer the running guest, finish or roll back.

The transfer is the one step that must not run twice: it is marked ``Transferring`` before it starts,
and an agent that finds its own ``Transferring`` step on start-up knows it died during the transfer.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes

from kubenova.driver.base import (
    ComputeDriver,
    CPUIncompatible,
    CpuInfo,
    DriverError,
    InstanceNotFound,
    InstanceSpec,
    MigrationProgress,
    PowerState,
)
from kubenova.handlers.agent.migration_handover import Handover
from kubenova.handlers.shared import COMPUTENODES, GROUP, VERSION, cancelled, flavor_of, typed

log = logging.getLogger(__name__)
#: Progress of a live transfer is written at most this often.
PROGRESS_INTERVAL = 2.0
#: How long a guest paused by a migration job's last phase may take to resume here or leave.
SETTLE_SECONDS = 30.0
#: A live transfer's deadline per GiB of guest memory (KubeVirt's completionTimeoutPerGiB default), and
#: the least any transfer gets (connecting, the first pass over a small guest).
DEFAULT_TIMEOUT_PER_GIB, MIN_DEADLINE = 150.0, 10.0


def progress_of(step: MigrationProgress) -> dict[str, Any]:
    """status.progress of a transfer under way; 100 % is said only once it has ended."""
    done = step.data_processed * 100 // step.data_total if step.data_total else 0
    return {
        "percent": min(99, done),
        "dataTotalBytes": step.data_total,
        "dataProcessedBytes": step.data_processed,
        "dataRemainingBytes": step.data_remaining,
        "iteration": step.iteration,
        "expectedDowntimeMs": step.expected_downtime_ms,
    }


class LiveSteps:
    """This node's steps of Live migrations, and the transfers running here (which a cancel aborts)."""

    def __init__(
        self,
        node: str,
        driver: ComputeDriver,
        handover: Handover,
        spec_for: Callable[[Mapping[str, Any], Mapping[str, Any]], InstanceSpec],
        objects: kubernetes.client.CustomObjectsApi,
        timeout_per_gib: float = DEFAULT_TIMEOUT_PER_GIB,
    ) -> None:
        """``spec_for(instance, flavor)``: the driver's view of the instance, its Secrets read."""
        self.timeout_per_gib = timeout_per_gib
        self._expired: dict[str, str] = {}  # migration uid -> why its transfer was stopped at its deadline
        self.node = node
        self.driver = driver
        self.handover = handover
        self.spec_for = spec_for
        self.objects = objects
        self._transfers: dict[str, str] = {}  # migration uid -> instance uid, while its transfer runs here
        self._aborted: set[str] = set()
        self.steps: dict[str, Callable[[dict[str, Any]], None]] = {
            "PrepareTarget": self.prepare_target,
            "Transfer": self.transfer,
            "Transferring": self.transferring,
            "FinishTarget": self.finish_target,
            "RollbackTarget": self.rollback_target,
        }

    def running(self, uid: str) -> bool:
        """Whether the migration's transfer runs here now (it holds a worker until it ends)."""
        return uid in self._transfers

    def stopping(self, body: Mapping[str, Any]) -> str | None:
        """Why the migration must stop where it is: cancelled, or its instance is being deleted (a user's
        delete never waits for a transfer to end)."""
        if cancelled(body):
            return "cancelled"
        instance = self.handover.instance_cache.objects.get(body["status"]["instanceUID"]) or {}
        if instance.get("metadata", {}).get("deletionTimestamp"):
            return "stopped: the instance is being deleted"
        return None

    def abort(self, uid: str, body: Mapping[str, Any]) -> bool:
        """Abort the migration's transfer running here if it must stop; whether it must."""
        if uid not in self._transfers or not self.stopping(body) or uid in self._aborted:
            return False
        self._aborted.add(uid)
        try:
            self.driver.abort_live_migration(self._transfers[uid])
        except DriverError as exc:
            log.warning("aborting the migration %s failed: %s", body["metadata"]["name"], exc)
        return True

    def forget(self, uid: str) -> None:
        """A deleted Migration's abort mark goes with it, so a long-lived agent does not grow."""
        self._aborted.discard(uid)

    def prepare_target(self, body: dict[str, Any]) -> None:
        """Target, first: refuse a source CPU this host lacks before any byte moves, then define the
        instance here (its own paths) and hand the definition to the source."""
        status = body["status"]
        source = status["sourceNode"]
        if cancelled(body):
            self.handover.finish(
                body, "Cancelled", f"cancelled before the transfer; the instance stays on {source}"
            )
            return
        instance = self.handover.instance(body)
        if instance["metadata"].get("deletionTimestamp"):
            self.handover.finish(
                body, "Cancelled", f"stopped: the instance is being deleted; nothing moved from {source}"
            )
            return
        cpu = (
            typed(self.objects.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, source)).get("status")
            or {}
        ).get("cpuInfo")
        try:
            if cpu:
                self.driver.compare_cpu(CpuInfo(**{**cpu, "features": tuple(cpu.get("features") or ())}))
            definition = self.driver.pre_live_migration(self.spec_for(instance, flavor_of(instance)))
        except CPUIncompatible as exc:
            self.handover.finish(
                body,
                "Failed",
                f"{self.node} cannot run a guest started on {source}: {exc}; choose "
                "another spec.targetNode, or stop the instance and use a Cold migration",
            )
            return
        except DriverError as exc:
            self.handover.finish(
                body,
                "Failed",
                f"{self.node} could not prepare for the instance: {exc}; it stays running on {source}",
            )
            return
        self.handover.hand_over(
            body,
            "Transfer",
            f"{self.node} is prepared; {source} transfers the instance",
            phase="Migrating",
            handoff={"definition": definition},
        )

    def transfer(self, body: dict[str, Any]) -> None:
        """Source: move the running guest (holding this worker until it ends); any failure or cancel
        hands over to the target's rollback, and the guest keeps running here."""
        status, spec = body["status"], body["spec"]
        uid, instance_uid = body["metadata"]["uid"], status["instanceUID"]
        why = self.stopping(body)
        if why:
            self.handover.hand_over(
                body,
                "RollbackTarget",
                f"{why} before the transfer; the instance stays on {self.node}",
                handoff={"outcome": "Cancelled"},
            )
            return
        self.handover.hand_over(
            body, "Transferring", f"transferring from {self.node} to {status['targetNode']}"
        )
        self._transfers[uid] = instance_uid
        deadline = self._deadline(body)
        try:
            self.driver.live_migration(
                instance_uid,
                status["handoff"]["targetURI"],
                status["handoff"]["definition"],
                functools.partial(self._progress, body, [0.0], (time.monotonic() + deadline[0], deadline[1])),
                max_bandwidth_mib=spec.get("bandwidthMiBps"),
            )
        except DriverError as exc:
            if not self._runs_here(instance_uid):  # the job ended on the target after all
                self.handover.hand_over(body, "FinishTarget", f"transferred despite: {exc}")
                return
            if uid in self._expired:  # stopped at its deadline
                outcome, message = (
                    "Failed",
                    f"{self._expired[uid]}; the instance keeps running on {self.node}",
                )
            elif uid in self._aborted:
                why = self.stopping(self.handover.cache.objects.get(uid, body)) or "cancelled"
                outcome, message = (
                    "Cancelled",
                    f"{why} during the transfer; it keeps running on {self.node}",
                )
            else:
                outcome, message = (
                    "Failed",
                    f"the transfer failed: {exc}; the instance keeps running on {self.node}",
                )
            self.handover.hand_over(body, "RollbackTarget", message, handoff={"outcome": outcome})
            return
        finally:
            self._transfers.pop(uid, None)
            self._expired.pop(uid, None)
        self.handover.hand_over(
            body,
            "FinishTarget",
            f"transferred; {status['targetNode']} takes over",
            progress={**(status.get("progress") or {}), "percent": 100, "dataRemainingBytes": 0},
        )

    def _deadline(self, body: Mapping[str, Any]) -> tuple[float, str]:
        """The transfer's time limit, in seconds, and how it was reckoned."""
        per_gib = float(body["spec"].get("completionTimeoutPerGiB") or self.timeout_per_gib)
        instance = self.handover.instance_cache.objects.get(body["status"]["instanceUID"])
        memory_mib = flavor_of(instance)["memoryMiB"] if instance else 1024
        seconds = max(MIN_DEADLINE, per_gib * memory_mib / 1024)
        return (
            seconds,
            f"{seconds:.0f} s ({per_gib:g} s per GiB of {memory_mib} MiB, at least {MIN_DEADLINE:g} s)",
        )

    def _progress(
        self, body: dict[str, Any], last: list[float], deadline: tuple[float, str], step: MigrationProgress
    ) -> None:
        """The transfer's progress callback: said at most every PROGRESS_INTERVAL (``last`` holds when it
        was said); a cancel the watch brought meanwhile, or the deadline (``(when, reckoning)``), aborts
        the transfer."""
        uid = body["metadata"]["uid"]
        if time.monotonic() > deadline[0] and uid not in self._expired and uid not in self._aborted:
            mib = 2**20
            self._expired[uid] = (
                f"the transfer did not complete within {deadline[1]}: {step.data_processed / mib:.1f} of "
                f"{step.data_total / mib:.1f} MiB moved, {step.data_remaining / mib:.1f} MiB left after "
                f"{step.iteration} iteration(s); raise spec.bandwidthMiBps or spec.completionTimeoutPerGiB, "
                "or move the guest when it writes less memory"
            )
            self.driver.abort_live_migration(body["status"]["instanceUID"])
            return
        if time.monotonic() - last[0] < PROGRESS_INTERVAL:
            return
        last[0] = time.monotonic()
        try:
            self.handover.write(body, {"progress": progress_of(step)})
        except kubernetes.client.ApiException as exc:  # progress is best effort; the transfer goes on
            log.warning("cannot write the progress of %s: %s", body["metadata"]["name"], exc.reason)
        if self.stopping(self.handover.cache.objects.get(uid, body)) and uid not in self._aborted:
            self._aborted.add(uid)
            self.driver.abort_live_migration(body["status"]["instanceUID"])

    def transferring(self, body: dict[str, Any]) -> None:
        """Found on start-up: this agent died during the transfer, so whether it finished is unknown.
        libvirtd goes on with a peer-to-peer job without us: abort it, then see where the guest ended."""
        instance_uid = body["status"]["instanceUID"]
        if self.driver.instance_exists(instance_uid):
            try:
                self.driver.abort_live_migration(instance_uid)
            except DriverError:
                pass  # no job was running any more, or it is too far along to stop
        if self._runs_here(instance_uid):
            self.handover.hand_over(
                body,
                "RollbackTarget",
                f"the agent on {self.node} restarted during the transfer; the "
                f"instance stays on {self.node}; create a new Migration to move it",
                handoff={"outcome": "Failed"},
            )
        else:
            self.handover.hand_over(
                body, "FinishTarget", "the transfer completed while the source's agent restarted"
            )

    def _runs_here(self, uid: str) -> bool:
        """Whether the guest is still on this host once any migration job on it has ended: a domain
        paused or stopped by the job's last phase either resumes here (it failed) or leaves (it
        succeeded). One still paused at the deadline (the user's pause) is here."""
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            try:
                state = self.driver.get_info(uid).state
            except InstanceNotFound:
                return False
            if state not in (PowerState.PAUSED, PowerState.SHUTOFF) or time.monotonic() > deadline:
                return True
            time.sleep(0.5)

    def finish_target(self, body: dict[str, Any]) -> None:
        """Target, last: the guest runs here; the instance object follows it (status, then the label)."""
        status = body["status"]
        instance = self.handover.instance(body)
        try:
            outcome = self.driver.post_live_migration_at_destination(status["instanceUID"])
        except InstanceNotFound:
            self.handover.finish(
                body,
                "Failed",
                f"the instance did not arrive on {self.node}; check the source "
                f"{status['sourceNode']} and the libvirt logs",
            )
            return
        self.handover.move_instance(instance, self.node, None)
        figures = {
            key: value
            for key, value in (("elapsedMs", outcome.elapsed_ms), ("downtimeMs", outcome.downtime_ms))
            if value is not None
        }
        said = ", ".join(f"{k[:-2]} {v} ms" for k, v in figures.items())
        self.handover.finish(
            body,
            "Succeeded",
            f"moved from {status['sourceNode']} to {self.node}" + (f" ({said})" if said else ""),
            progress={**(status.get("progress") or {}), **figures},
        )

    def rollback_target(self, body: dict[str, Any]) -> None:
        """Target: drop what pre_live_migration made, then end the Migration with the source's outcome;
        unless the guest runs here: only a completed migration resumes it here, and then this is the only
        running copy (the source's abort came too late), so the migration is finished instead."""
        status = body["status"]
        uid = status["instanceUID"]
        if self.driver.instance_exists(uid) and self.driver.get_info(uid).state is PowerState.RUNNING:
            log.warning("%s: the guest runs here after all; finishing instead of rolling back", uid)
            self.finish_target(body)
            return
        self.driver.rollback_live_migration_at_destination(uid)
        self.handover.finish(body, status["handoff"].get("outcome", "Failed"), status.get("message", ""))
