"""The steps of a Live migration: prepare the target, transfer the running guest, finish or roll back.

The transfer is the one step that must not run twice: it is marked ``Transferring`` before it starts,
and an agent that finds its own ``Transferring`` step on start-up knows it died during the transfer. Its
switch to post-copy (convergence.py says when) is the point of no return: it is marked in
status.progress.mode before it is made, and from then on nothing aborts the transfer or rolls the target
back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes

from kubenova import faults
from kubenova.driver.base import (
    ComputeDriver,
    Convergence,
    CPUIncompatible,
    CpuInfo,
    DriverError,
    InstanceNotFound,
    InstanceSpec,
    MigrationProgress,
    PowerState,
)
from kubenova.handlers.agent.convergence import (
    POST_COPY,
    PRE_COPY,
    Action,
    TransferWatch,
    convergence_of,
    how_it_ended,
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


def progress_of(step: MigrationProgress, watch: TransferWatch) -> dict[str, Any]:
    """status.progress of a transfer under way; 100 % is said only once it has ended."""
    done = step.data_processed * 100 // step.data_total if step.data_total else 0
    return watch.figures() | {
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
        convergence: Convergence | None = None,
    ) -> None:
        """``spec_for(instance, flavor)``: the driver's view of the instance, its Secrets read;
        ``timeout_per_gib`` and ``convergence`` what a Migration that does not say gets."""
        self.timeout_per_gib = timeout_per_gib
        self.convergence = convergence or Convergence()
        self._watches: dict[str, TransferWatch] = {}  # migration uid -> its transfer's clock, while it runs
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
        why = self.stopping(body)
        if uid not in self._transfers or not why or uid in self._aborted:
            return False
        self._aborted.add(uid)
        log.info("%s: aborting the transfer (%s)", body["metadata"]["name"], why)
        if self._switched(uid):
            log.warning(
                "%s: in post-copy, the transfer cannot stop; it ends on its own", body["metadata"]["name"]
            )
            return True
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
        # A guest with a named model runs that model on any host that lists it (pre_live_migration checks);
        # else its CPU may be the source host's own (host-model), which this host must have all of.
        named = ((instance.get("spec") or {}).get("cpu") or {}).get("model")
        try:
            if cpu and not named:
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
        seconds, reckoning = self._deadline(body)
        now = time.monotonic()
        watch = self._watches[uid] = TransferWatch(now, now + seconds, convergence_of(spec, self.convergence))
        try:
            self.driver.live_migration(
                instance_uid,
                status["handoff"]["targetURI"],
                status["handoff"]["definition"],
                functools.partial(self._progress, body, reckoning),
                max_bandwidth_mib=spec.get("bandwidthMiBps"),
                convergence=watch.convergence,
            )
        except DriverError as exc:
            if watch.post_copy_at is not None and not self.driver.instance_exists(instance_uid):
                self.driver.drop_volume_copies(instance_uid)
                self.handover.hand_over(body, "FinishTarget", f"transferred in post-copy despite: {exc}")
                return
            if watch.post_copy_at is not None:  # past the point of no return: roll nothing back
                self.handover.finish(body, "Failed", self._lost(status, exc))
                return
            if not self._runs_here(instance_uid):  # the job ended on the target after all
                self.driver.drop_volume_copies(instance_uid)
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
            self.handover.hand_over(
                body,
                "RollbackTarget",
                message,
                handoff={"outcome": outcome},
                progress={**(body["status"].get("progress") or {}), "mode": PRE_COPY},  # never switched
            )
            return
        finally:
            self._transfers.pop(uid, None)
            self._expired.pop(uid, None)
            self._watches.pop(uid, None)
        self.handover.hand_over(
            body,
            "FinishTarget",
            f"transferred; {status['targetNode']} takes over",
            progress={
                **(body["status"].get("progress") or {}),
                **watch.figures(),  # the last report's, which the rate of writes may have skipped
                "percent": 100,
                "dataRemainingBytes": 0,
            },
        )

    def _switched(self, uid: str) -> bool:
        watch = self._watches.get(uid)
        return watch is not None and watch.post_copy_at is not None

    def _lost(self, status: Mapping[str, Any], exc: DriverError) -> str:
        """What a failure after the switch to post-copy means, and what a person can do about it."""
        return (
            f"the transfer failed in post-copy: {exc}; no node holds the whole guest: it ran on "
            f"{status['targetNode']} with memory still on {self.node}, where it is paused. kubenova "
            "destroys, resumes and rolls back neither half while this Migration exists: give the guest "
            f"up (destroy both halves, then delete this Migration: the instance boots afresh on {self.node})"
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

    def _progress(self, body: dict[str, Any], reckoning: str, step: MigrationProgress) -> None:
        """The transfer's progress callback: said at most every PROGRESS_INTERVAL; the deadline (reckoned as
        ``reckoning`` says), or a cancel the watch brought meanwhile, aborts the transfer; the deadline, or a
        pre-copy that cannot keep up, switches it to post-copy instead when the Migration allows it."""
        faults.point("transfer.progress")  # mid-transfer: libvirtd goes on with the job without this agent
        uid, instance_uid = body["metadata"]["uid"], body["status"]["instanceUID"]
        watch, now = self._watches[uid], time.monotonic()
        action = watch.next(now, step)
        if action is Action.ABORT and uid not in self._expired and uid not in self._aborted:
            mib = 2**20
            self._expired[uid] = (
                f"the transfer did not complete within {reckoning}: {step.data_processed / mib:.1f} of "
                f"{step.data_total / mib:.1f} MiB moved, {step.data_remaining / mib:.1f} MiB left after "
                f"{step.iteration} iteration(s); raise spec.bandwidthMiBps or spec.completionTimeoutPerGiB, "
                "allow spec.convergence, or move the guest when it writes less memory"
            )
            self._abort_job(instance_uid)
            return
        if action is Action.POST_COPY and uid not in self._aborted:
            self._switch(body, watch, step)
        if now - watch.said < PROGRESS_INTERVAL:
            return
        watch.said = now
        try:
            self.handover.write(body, {"progress": progress_of(step, watch)})
        except kubernetes.client.ApiException as exc:  # progress is best effort; the transfer goes on
            log.warning("cannot write the progress of %s: %s", body["metadata"]["name"], exc.reason)
        why = self.stopping(self.handover.cache.objects.get(uid, body))
        if why and uid not in self._aborted:
            self._aborted.add(uid)
            log.info("%s: aborting the transfer at its progress report (%s)", body["metadata"]["name"], why)
            if watch.post_copy_at is None:
                self._abort_job(instance_uid)

    def _abort_job(self, instance_uid: str) -> None:
        """Abort from inside the transfer: a failure must not leave live_migration while its job runs on
        (the step would judge a job still under way); the job ends, one way or the other, on its own."""
        try:
            self.driver.abort_live_migration(instance_uid)
        except DriverError as exc:
            log.warning("aborting the transfer of %s failed: %s; it runs on to its end", instance_uid, exc)

    def _switch(self, body: dict[str, Any], watch: TransferWatch, step: MigrationProgress) -> None:
        """Switch to post-copy, said first: a restarted agent, and the instance's reconciler, must know
        that no host holds the whole guest. Not switched when that cannot be said (tried again at the next
        pass, or past the deadline at the next report); when libvirt refuses, the transfer goes on as one
        without post-copy (the deadline aborts it)."""
        watch.post_copy_at = time.monotonic()
        try:
            self.handover.write(body, {"progress": progress_of(step, watch)})
            self.driver.live_migration_force_complete(body["status"]["instanceUID"])
        except kubernetes.client.ApiException as exc:
            watch.post_copy_at = None
            log.warning("%s: not switched to post-copy: %s", body["metadata"]["name"], exc.reason)
            return
        except DriverError as exc:  # the job ended meanwhile, or libvirt refuses: go on as without post-copy
            log.warning("%s: not switched to post-copy: %s", body["metadata"]["name"], exc)
            watch.post_copy_at = None
            watch.convergence = dataclasses.replace(watch.convergence, post_copy=False)
            return
        watch.said = watch.post_copy_at
        log.info("%s: switched to post-copy", body["metadata"]["name"])

    def transferring(self, body: dict[str, Any]) -> None:
        """Found on start-up: this agent died during the transfer, so whether it finished is unknown.
        libvirtd goes on with a peer-to-peer job without us: abort it, then see where the guest ended."""
        instance_uid = body["status"]["instanceUID"]
        if (body["status"].get("progress") or {}).get("mode") == POST_COPY:
            if self.driver.instance_exists(instance_uid):  # it goes on in libvirtd, or it failed: wait
                raise DriverError(
                    f"the transfer was in post-copy when the agent on {self.node} restarted; nothing may "
                    "stop it, so the agent waits for the guest to leave"
                )
            self.handover.hand_over(
                body, "FinishTarget", "the transfer completed in post-copy while the agent restarted"
            )
            return
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
        else:  # what the transfer's own end removes here (filter, folder, volumes), which the death skipped
            self.driver.drop_volume_copies(instance_uid)
            self.driver.destroy(instance_uid)
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
            f"moved from {status['sourceNode']} to {self.node}"
            + (f" ({said})" if said else "")
            + how_it_ended(status.get("progress") or {}),
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
        self.driver.drop_volume_copies(uid)
        self.driver.rollback_live_migration_at_destination(uid)
        self.handover.finish(body, status["handoff"].get("outcome", "Failed"), status.get("message", ""))
