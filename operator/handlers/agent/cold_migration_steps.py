"""The steps of a Cold migration (and resize): stop the source, copy and start on the target, then
confirm (the source's copy goes) or revert (the target's copy goes, the source starts again)."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import Any

from kubenova.driver.base import ComputeDriver, DriverError, InstanceSpec
from kubenova.handlers.agent import power
from kubenova.handlers.agent.migration_handover import Handover
from kubenova.handlers.shared import cancelled, flavor_of


class ColdSteps:
    """This node's steps of Cold migrations."""

    def __init__(
        self,
        node: str,
        driver: ComputeDriver,
        handover: Handover,
        spec_for: Callable[[Mapping[str, Any], Mapping[str, Any]], InstanceSpec],
    ) -> None:
        """``spec_for(instance, flavor)``: the driver's view of the instance, its Secrets read."""
        self.node = node
        self.driver = driver
        self.handover = handover
        self.spec_for = spec_for
        self.steps: dict[str, Callable[[dict[str, Any]], None]] = {
            "PowerOffSource": self.power_off_source,
            "FinishTarget": self.finish_target,
            "AwaitConfirmation": self.await_confirmation,
            "RevertTarget": self.revert_target,
            "RevertSource": self.revert_source,
        }

    def power_off_source(self, body: dict[str, Any]) -> None:
        """Source, first: stop the guest and name its disks for the target; the flavor it ran with goes
        along, so a revert can give it back."""
        status = body["status"]
        if cancelled(body):
            self.handover.finish(
                body, "Cancelled", f"cancelled before it started; the instance stays on {self.node}"
            )
            return
        instance = self.handover.instance(body)
        disks = self.driver.migrate_disk_and_power_off(status["instanceUID"], status["handoff"]["targetURI"])
        self.handover.hand_over(
            body,
            "FinishTarget",
            f"stopped on {self.node}; {status['targetNode']} copies the disks",
            phase="Migrating",
            handoff={"disks": disks, "flavor": flavor_of(instance)},
        )

    def finish_target(self, body: dict[str, Any]) -> None:
        """Target: copy the disks (resized to the new flavor) and start the instance here; the source's
        copy stays until the decision."""
        status, spec = body["status"], body["spec"]
        source, handoff = status["sourceNode"], status["handoff"]
        if cancelled(body):
            self.handover.hand_over(
                body,
                "RevertSource",
                f"cancelled; {source} starts the instance again",
                handoff={"outcome": "Cancelled"},
            )
            return
        instance = self.handover.instance(body)
        flavor = dict(spec.get("flavor") or handoff["flavor"])
        power_on = power.wanted(instance.get("spec") or {}) != "Stopped"
        if not self.driver.instance_exists(status["instanceUID"]):
            try:
                self.driver.finish_migration(
                    self.spec_for(instance, flavor),
                    list(handoff.get("disks") or []),
                    self.handover.published_uri(source),
                    power_on,
                )
            except DriverError as exc:
                self.driver.destroy(status["instanceUID"])
                self.handover.hand_over(
                    body,
                    "RevertSource",
                    f"{self.node} could not start the instance: {exc}; {source} starts the original again",
                    handoff={"outcome": "Failed"},
                )
                return
        self.handover.move_instance(instance, self.node, flavor)
        confirmation = spec.get("confirmation") or {}
        size = f"{flavor['vcpus']} vCPU, {flavor['memoryMiB']} MiB"
        if confirmation.get("policy", "Auto") == "Auto":
            seconds = int(confirmation.get("autoConfirmSeconds", 300))
            deadline = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
            when = deadline.strftime("%Y-%m-%dT%H:%M:%SZ")
            self.handover.hand_over(
                body,
                "AwaitConfirmation",
                f"running on {self.node} ({size}); confirms itself at {when} "
                "unless spec.decision says Revert first",
                phase="AwaitingConfirmation",
                handoff={"confirmAfter": when},
            )
        else:
            self.handover.hand_over(
                body,
                "AwaitConfirmation",
                f"running on {self.node} ({size}); set spec.decision to Confirm (frees {source}) or Revert",
                phase="AwaitingConfirmation",
            )

    def await_confirmation(self, body: dict[str, Any]) -> None:
        """Both nodes look; whichever owns the decision acts: Revert (or a cancel) goes to the target
        first, Confirm (by hand or after the deadline) lets the source delete its copy."""
        status, spec = body["status"], body["spec"]
        if spec.get("decision") == "Revert" or cancelled(body):  # this is the target
            # First a step of its own: while it runs, this node's instance side keeps its hands off.
            self.handover.hand_over(
                body,
                "RevertTarget",
                f"reverting; {self.node} deletes its copy",
                handoff={"outcome": "Reverted" if spec.get("decision") == "Revert" else "Cancelled"},
            )
            self.revert_target(body)
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
                self.handover.cache.schedule(body["metadata"]["uid"], left + 0.1)
                return
        self.driver.confirm_migration(status["instanceUID"])
        how = "confirmed" if spec.get("decision") == "Confirm" else "confirmed automatically"
        self.handover.finish(
            body,
            "Succeeded",
            f"{how}: the instance runs on {status['targetNode']}; its copy on {self.node} is deleted",
        )

    def revert_target(self, body: dict[str, Any]) -> None:
        """Target: delete its copy and give the instance back to the source, old flavor included."""
        status = body["status"]
        instance = self.handover.instance(body)
        self.driver.drop_volume_copies(status["instanceUID"])
        self.driver.destroy(status["instanceUID"])
        self.handover.move_instance(instance, status["sourceNode"], status["handoff"]["flavor"])
        self.handover.hand_over(
            body, "RevertSource", f"reverting; {status['sourceNode']} starts the original again"
        )

    def revert_source(self, body: dict[str, Any]) -> None:
        """Source, last: start the original again (unless the spec asks it stopped)."""
        status = body["status"]
        instance = self.handover.instance(body)
        power_on = power.wanted(instance.get("spec") or {}) != "Stopped"
        self.driver.finish_revert_migration(status["instanceUID"], power_on)
        outcome = status["handoff"].get("outcome", "Reverted")
        message = (
            status.get("message", "")
            if outcome != "Reverted"
            else f"reverted: the instance runs on {self.node} again with its original flavor"
        )
        self.handover.finish(body, outcome, message)
