"""The migration steps (MigrationAgent) of two nodes against two FakeDrivers and one in-memory apiserver:
live and cold moves, cancel, revert, confirm, a CPU the target lacks, an agent restarted mid-transfer
and an instance deleted meanwhile. The controller's part (choosing the target) is the test's."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import pathlib
from collections.abc import Mapping
from typing import Any

import pytest

from kubenova.driver.base import ALLOW_ALL, Convergence, PowerState
from kubenova.handlers.agent import live_migration_steps
from kubenova.handlers.agent.events import EventPoster
from kubenova.handlers.agent.migration_steps import MigrationAgent
from kubenova.handlers.shared import COMPUTENODES, MIGRATIONS, NODE_LABEL, VIRTUALINSTANCES
from testground import guest
from tests.unit.agent_harness import Node, make_node
from tests.unit.reconcile_fakes import FakeApiserver, MemoryStatusWriter


@dataclasses.dataclass
class Side:
    node: Node
    migrations: MigrationAgent


class CancelDuringTransfer(MemoryStatusWriter):
    """The user's cancel arrives just as the transfer starts: after "Transferring" is said, before it ends."""

    def write(
        self, body: Mapping[str, Any], patch: Mapping[str, Any], guard: bool = False
    ) -> Mapping[str, Any] | None:
        if patch.get("step") == "Transferring":
            self.api.objects[(MIGRATIONS, "ns", "m")]["spec"]["cancel"] = True
        return super().write(body, patch, guard)


class DeleteDuringTransfer(MemoryStatusWriter):
    """The user deletes the instance just as the transfer starts (its finalizers hold it, being deleted)."""

    cache: Any = None  # the source's instance cache, where its watch would put the deleting instance

    def write(
        self, body: Mapping[str, Any], patch: Mapping[str, Any], guard: bool = False
    ) -> Mapping[str, Any] | None:
        if patch.get("step") == "Transferring":
            instance = self.api.objects[(VIRTUALINSTANCES, "ns", "vm")]
            instance["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
            DeleteDuringTransfer.cache.seen(None, self.api.touch(instance))  # read fresh: current
        return super().write(body, patch, guard)


def side(
    tmp_path: pathlib.Path,
    api: FakeApiserver,
    name: str,
    writer: type[MemoryStatusWriter] = MemoryStatusWriter,
) -> Side:
    folder = tmp_path / name
    folder.mkdir()
    node = make_node(folder, api=api, name=name)
    agent = MigrationAgent(
        name,
        node.driver,
        api,  # type: ignore[arg-type]
        writer(api, MIGRATIONS),
        node.status,
        EventPoster(api, name),  # type: ignore[arg-type]
        node.migrations,
        node.cache,
        node.agent.driver_spec,
    )
    return Side(node, agent)


class Cluster:
    """A source and a target node; ``start`` does what the controller's planner does."""

    def __init__(
        self,
        tmp_path: pathlib.Path,
        writer: type[MemoryStatusWriter] = MemoryStatusWriter,
        boot: dict[str, Any] | None = None,
    ) -> None:
        self.api = FakeApiserver()
        self.source = side(tmp_path, self.api, "node-0", writer)
        self.target = side(tmp_path, self.api, "node-1")
        for each in (self.source, self.target):  # as each agent registers its node
            cpu = dataclasses.asdict(each.node.driver.cpu)
            published = {"cpuInfo": cpu, "migrationURI": each.node.driver.uri}
            self.api.add(COMPUTENODES, {"metadata": {"name": each.node.name}, "status": published})
        self.uid = self.source.node.create("vm", boot=boot or {"image": {"name": "disk.img"}})

    def start(self, kind: str, **spec: Any) -> None:
        self.api.add(
            MIGRATIONS,
            {
                "metadata": {"name": "m", "namespace": "ns", "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"type": kind, "instanceRef": {"name": "vm"}, **spec},
                "status": {
                    "phase": "Scheduling",
                    "step": "PrepareTarget" if kind == "Live" else "PowerOffSource",
                    "instanceUID": self.uid,
                    "sourceNode": "node-0",
                    "targetNode": "node-1",
                    "handoff": {
                        "sourceURI": self.source.node.driver.uri,
                        "targetURI": self.target.node.driver.uri,
                    },
                },
            },
        )

    def migration(self) -> dict[str, Any]:
        found = self.api.get(MIGRATIONS, "ns", "m")
        assert found is not None
        return found

    def change(self, **spec: Any) -> None:
        self.api.change(MIGRATIONS, "ns", "m", spec)

    def run(self, rounds: int = 8) -> dict[str, Any]:
        """Both agents see the newest Migration and take their turns until nobody has one left."""
        for _ in range(rounds):
            for each in (self.source, self.target):
                uid = each.node.migrations.seen(None, self.migration())  # read fresh: current
                each.migrations.handle(uid)
        return self.migration()

    def instance(self) -> dict[str, Any]:
        found = self.api.get(VIRTUALINSTANCES, "ns", "vm")
        assert found is not None
        return found


@pytest.fixture
def cluster(tmp_path: pathlib.Path) -> Cluster:
    return Cluster(tmp_path)


def test_a_live_migration_moves_the_running_guest_and_the_binding(cluster: Cluster) -> None:
    cluster.start("Live")
    done = cluster.run()
    assert (done["status"]["phase"], done["status"]["step"]) == ("Succeeded", "Done")
    assert done["status"]["progress"]["percent"] == 100
    assert not cluster.source.node.driver.instance_exists(cluster.uid)
    assert cluster.target.node.state(cluster.uid) is PowerState.RUNNING
    instance = cluster.instance()
    assert instance["metadata"]["labels"][NODE_LABEL] == "node-1"
    assert instance["status"]["node"] == "node-1"
    assert "Migrated" in cluster.api.reasons("m")
    assert ("instance", cluster.uid) in [key for key, _ in cluster.target.node.queue.later]


def test_a_live_migration_cancelled_before_the_transfer_leaves_the_guest_on_the_source(
    cluster: Cluster,
) -> None:
    cluster.start("Live")
    cluster.target.migrations.handle(cluster.target.node.migrations.seen("ADDED", cluster.migration()))
    assert cluster.migration()["status"]["step"] == "Transfer"
    cluster.change(cancel=True)
    done = cluster.run()
    assert done["status"]["phase"] == "Cancelled"
    assert cluster.source.node.state(cluster.uid) is PowerState.RUNNING
    assert not cluster.target.node.driver.instance_exists(cluster.uid)
    assert cluster.target.node.driver.instance_files(cluster.uid) == []  # its prepared folder went too
    assert cluster.instance()["metadata"]["labels"][NODE_LABEL] == "node-0"


def test_a_live_migration_cancelled_during_the_transfer_is_aborted(tmp_path: pathlib.Path) -> None:
    cluster = Cluster(tmp_path, CancelDuringTransfer)
    cluster.start("Live")
    done = cluster.run()
    assert done["status"]["phase"] == "Cancelled" and "during the transfer" in done["status"]["message"]
    assert cluster.source.node.state(cluster.uid) is PowerState.RUNNING
    assert cluster.target.node.driver.instance_files(cluster.uid) == []


def test_deleting_the_instance_stops_its_transfer_and_the_delete_goes_on(tmp_path: pathlib.Path) -> None:
    cluster = Cluster(tmp_path, DeleteDuringTransfer)
    DeleteDuringTransfer.cache = cluster.source.node.cache
    cluster.start("Live")
    done = cluster.run()
    assert done["status"]["phase"] == "Cancelled", done["status"]["message"]
    assert "the instance is being deleted during the transfer" in done["status"]["message"]
    assert not cluster.target.node.driver.instance_exists(cluster.uid)
    assert cluster.target.node.driver.instance_files(cluster.uid) == []
    cluster.source.node.agent.handle(cluster.uid)  # the end of the migration lets the delete go on
    assert not cluster.source.node.driver.instance_exists(cluster.uid)
    assert cluster.api.get(VIRTUALINSTANCES, "ns", "vm") is None


def test_the_delete_of_an_instance_aborts_its_transfer_at_once(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete's watch event aborts the transfer under way, once, not at its next progress report
    (which a slow or stalled job may not give)."""
    cluster.start("Live")
    source = cluster.source
    aborts: list[str] = []
    monkeypatch.setattr(source.node.driver, "abort_live_migration", aborts.append)
    migration = source.node.migrations.seen(None, cluster.migration())
    source.migrations.live._transfers[migration] = cluster.uid  # noqa: SLF001 (its transfer runs here)
    source.migrations.instance_deleted(cluster.uid)
    assert aborts == [], "an instance not being deleted keeps its transfer"
    instance = cluster.api.objects[(VIRTUALINSTANCES, "ns", "vm")]
    instance["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    source.node.cache.seen(None, cluster.api.touch(instance))
    source.migrations.instance_deleted(cluster.uid)
    source.migrations.instance_deleted(cluster.uid)
    assert aborts == [cluster.uid]


def test_a_deleting_instance_is_not_prepared_for(cluster: Cluster) -> None:
    cluster.api.objects[(VIRTUALINSTANCES, "ns", "vm")]["metadata"]["deletionTimestamp"] = (
        "2026-01-01T00:00:00Z"
    )
    cluster.start("Live")
    done = cluster.run()
    assert done["status"]["phase"] == "Cancelled" and "being deleted" in done["status"]["message"]
    assert not cluster.target.node.driver.instance_exists(cluster.uid)


def test_a_transfer_past_its_deadline_fails_with_the_figures_and_the_guest_stays(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline is reckoned from the guest's memory (128 MiB at 8 s per GiB: 1 s, at least 10 s); the
    clock jumps past it at the transfer's first report."""
    clock = iter([1000.0, 1000.0] + [5000.0] * 100)
    monkeypatch.setattr(live_migration_steps.time, "monotonic", lambda: next(clock))
    cluster.start("Live", completionTimeoutPerGiB=8)
    done = cluster.run()
    status = done["status"]
    assert status["phase"] == "Failed", status["message"]
    assert "did not complete within 10 s (8 s per GiB of 128 MiB, at least 10 s)" in status["message"]
    assert "MiB moved" in status["message"] and "spec.completionTimeoutPerGiB" in status["message"]
    assert cluster.source.node.state(cluster.uid) is PowerState.RUNNING
    assert not cluster.target.node.driver.instance_exists(cluster.uid)


#: A guest that rewrites 64 MiB of its 128 MiB without end: the fake's pre-copy never catches up with it.
BUSY = {
    "kernel": {"image": "vmlinuz", "initrd": "initrd.img", "cmdline": f"console=ttyS0 {guest.dirty_hook(64)}"}
}


def clock_jumps_at_report(monkeypatch: pytest.MonkeyPatch, report: int) -> None:
    """The clock passes every deadline at the transfer's ``report``-th progress report (the transfer's own
    start reads it once first)."""
    clock = itertools.chain([1000.0] * report, itertools.repeat(5000.0))
    monkeypatch.setattr(live_migration_steps.time, "monotonic", lambda: next(clock))


def test_a_busy_guest_fails_at_its_deadline_without_convergence(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = Cluster(tmp_path, boot=BUSY)
    clock_jumps_at_report(monkeypatch, 3)
    cluster.start("Live")
    status = cluster.run()["status"]
    assert status["phase"] == "Failed" and "did not complete within" in status["message"], status["message"]
    assert "spec.convergence" in status["message"] and status["progress"]["mode"] == "PreCopy"
    assert cluster.source.node.state(cluster.uid) is PowerState.RUNNING
    assert not cluster.target.node.driver.instance_exists(cluster.uid)


def test_post_copy_ends_a_pre_copy_that_cannot_keep_up_and_says_so(tmp_path: pathlib.Path) -> None:
    """No deadline is near: the third pass begins with all the second one had, so it switches then."""
    cluster = Cluster(tmp_path, boot=BUSY)
    cluster.start("Live", convergence={"autoConverge": False, "postCopy": True})
    status = cluster.run()["status"]
    assert status["phase"] == "Succeeded", status["message"]
    assert "converged with post-copy after 0 s" in status["message"]
    assert status["progress"]["mode"] == "PostCopy" and status["progress"]["postCopyAfterMs"] >= 0
    assert cluster.target.node.state(cluster.uid) is PowerState.RUNNING
    assert not cluster.source.node.driver.instance_exists(cluster.uid)
    assert cluster.instance()["metadata"]["labels"][NODE_LABEL] == "node-1"


def test_auto_converge_is_asked_for_and_said(tmp_path: pathlib.Path) -> None:
    cluster = Cluster(tmp_path, boot=BUSY)
    cluster.start("Live", convergence={"autoConverge": True, "postCopy": False})
    status = cluster.run()["status"]
    assert status["phase"] == "Succeeded", status["message"]
    assert status["progress"]["mode"] == "PreCopy" and status["progress"]["cpuThrottlePercent"] == 99
    assert "converged with auto-converge, the guest's vCPUs slowed by 99 %" in status["message"]


def test_at_the_deadline_post_copy_comes_instead_of_the_abort(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With auto-converge too, post-copy waits for the deadline; there the transfer is switched, never
    aborted, and the deadline does not count any more."""
    cluster = Cluster(tmp_path, boot=BUSY)
    aborts: list[str] = []
    monkeypatch.setattr(cluster.source.node.driver, "abort_live_migration", aborts.append)
    clock_jumps_at_report(monkeypatch, 2)
    cluster.start("Live", convergence={"autoConverge": True, "postCopy": True})
    status = cluster.run()["status"]
    assert status["phase"] == "Succeeded" and status["progress"]["mode"] == "PostCopy", status["message"]
    assert aborts == []
    assert cluster.target.node.state(cluster.uid) is PowerState.RUNNING


def test_the_agents_default_convergence_serves_a_migration_that_names_none(tmp_path: pathlib.Path) -> None:
    cluster = Cluster(tmp_path, boot=BUSY)
    cluster.source.migrations.live.convergence = Convergence(post_copy=True)
    cluster.start("Live")
    assert cluster.run()["status"]["progress"]["mode"] == "PostCopy"


def test_a_failure_after_the_switch_rolls_nothing_back_and_holds_both_halves(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Post-copy is the point of no return: the target's half runs with memory missing, the source's is
    paused. Nothing destroys, resumes or rolls back either; the Migration says what a person can do."""
    cluster = Cluster(tmp_path, boot=BUSY)
    cluster.source.node.driver.break_post_copy(cluster.uid)
    rollbacks: list[str] = []
    monkeypatch.setattr(
        cluster.target.node.driver, "rollback_live_migration_at_destination", rollbacks.append
    )
    cluster.start("Live", convergence={"postCopy": True})
    status = cluster.run()["status"]
    assert status["phase"] == "Failed" and "failed in post-copy" in status["message"], status["message"]
    assert "no node holds the whole guest" in status["message"] and "give the guest up" in status["message"]
    assert rollbacks == [], "the target was not rolled back"
    assert cluster.source.node.state(cluster.uid) is PowerState.PAUSED
    cluster.source.node.agent.handle(cluster.uid)  # the instance side leaves the paused half alone
    assert cluster.source.node.state(cluster.uid) is PowerState.PAUSED
    assert cluster.instance()["metadata"]["labels"][NODE_LABEL] == "node-0"


def test_a_source_restarted_in_post_copy_waits_for_the_transfer_and_never_aborts(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.start("Live", convergence={"postCopy": True})
    cluster.target.migrations.handle(cluster.target.node.migrations.seen("ADDED", cluster.migration()))
    stored = cluster.api.objects[(MIGRATIONS, "ns", "m")]
    stored["status"]["step"] = "Transferring"  # said, switched, then the agent died
    stored["status"]["progress"] = {"mode": "PostCopy"}
    cluster.api.touch(stored)
    aborts: list[str] = []
    monkeypatch.setattr(cluster.source.node.driver, "abort_live_migration", aborts.append)
    waiting = cluster.run()
    assert waiting["status"]["step"] == "Transferring" and aborts == []
    assert cluster.target.node.driver.instance_files(cluster.uid) != []
    status = waiting["status"]
    cluster.source.node.driver.live_migration(  # libvirtd finishes the job meanwhile
        cluster.uid, status["handoff"]["targetURI"], status["handoff"]["definition"]
    )
    done = cluster.run()
    assert done["status"]["phase"] == "Succeeded", done["status"]["message"]
    assert cluster.target.node.state(cluster.uid) is PowerState.RUNNING


def test_a_target_whose_cpu_lacks_a_feature_refuses_before_anything_moves(cluster: Cluster) -> None:
    source = cluster.api.objects[(COMPUTENODES, None, "node-0")]["status"]["cpuInfo"]
    source["features"] = [*source["features"], "avx512-fake"]
    cluster.start("Live")
    done = cluster.run()
    assert (
        done["status"]["phase"] == "Failed"
        and "cannot run a guest started on node-0" in done["status"]["message"]
    )
    assert cluster.source.node.state(cluster.uid) is PowerState.RUNNING


def test_a_source_agent_restarted_during_the_transfer_rolls_back(cluster: Cluster) -> None:
    cluster.start("Live")
    cluster.target.migrations.handle(cluster.target.node.migrations.seen("ADDED", cluster.migration()))
    stored = cluster.api.objects[(MIGRATIONS, "ns", "m")]
    stored["status"]["step"] = "Transferring"  # said, then the agent died before the transfer ended
    cluster.api.touch(stored)
    done = cluster.run()
    assert (
        done["status"]["phase"] == "Failed" and "restarted during the transfer" in done["status"]["message"]
    )
    assert cluster.source.node.state(cluster.uid) is PowerState.RUNNING
    assert not cluster.target.node.driver.instance_exists(cluster.uid)
    assert cluster.target.node.driver.instance_files(cluster.uid) == []


def transferred_behind_the_agents_back(cluster: Cluster, step: str, **handoff: Any) -> None:
    """The target prepared; then libvirt finished the transfer while the source's agent was away (a
    peer-to-peer job runs in libvirtd), and the Migration still says ``step``."""
    cluster.start("Live")
    cluster.target.migrations.handle(cluster.target.node.migrations.seen("ADDED", cluster.migration()))
    stored = cluster.api.objects[(MIGRATIONS, "ns", "m")]
    status = stored["status"]
    cluster.source.node.driver.live_migration(
        cluster.uid, status["handoff"]["targetURI"], status["handoff"]["definition"]
    )
    status["step"] = step
    status["handoff"].update(handoff)
    cluster.api.touch(stored)


def test_a_transfer_that_completed_while_the_source_agent_was_away_is_finished(cluster: Cluster) -> None:
    transferred_behind_the_agents_back(cluster, "Transferring")
    source = cluster.source.node.driver
    # what the transfer's own end removes on the source, left behind by the agent that died before it
    source.ensure_filtering_rules_for_instance(cluster.uid, ALLOW_ALL)
    done = cluster.run()
    assert done["status"]["phase"] == "Succeeded", done["status"]["message"]
    assert not source.instance_exists(cluster.uid)
    assert source.filtering_rules(cluster.uid) == ()
    assert cluster.target.node.state(cluster.uid) is PowerState.RUNNING
    assert cluster.instance()["metadata"]["labels"][NODE_LABEL] == "node-1"


def test_a_rollback_never_destroys_the_only_running_copy(cluster: Cluster) -> None:
    """The source's abort came too late (the job had just finished) and it asked for a rollback: the
    target sees the guest running there, which only a completed migration does, and finishes instead."""
    transferred_behind_the_agents_back(cluster, "RollbackTarget", outcome="Cancelled")
    done = cluster.run()
    assert done["status"]["phase"] == "Succeeded", done["status"]["message"]
    assert cluster.target.node.state(cluster.uid) is PowerState.RUNNING
    assert not cluster.source.node.driver.instance_exists(cluster.uid)
    assert cluster.instance()["status"]["node"] == "node-1"


def test_an_instance_deleted_during_the_migration_ends_it(cluster: Cluster) -> None:
    cluster.start("Live")
    del cluster.api.objects[(VIRTUALINSTANCES, "ns", "vm")]
    done = cluster.run()
    assert (
        done["status"]["phase"] == "Failed"
        and "was deleted during the migration" in done["status"]["message"]
    )


def test_a_cold_resize_waits_for_confirmation_then_frees_the_source(cluster: Cluster) -> None:
    cluster.start("Cold", flavor={"vcpus": 2, "memoryMiB": 256}, confirmation={"policy": "Manual"})
    waiting = cluster.run()
    assert (waiting["status"]["phase"], waiting["status"]["step"]) == (
        "AwaitingConfirmation",
        "AwaitConfirmation",
    )
    assert cluster.target.node.driver.get_info(cluster.uid).num_cpu == 2
    assert cluster.source.node.state(cluster.uid) is PowerState.SHUTOFF  # kept until confirmed
    instance = cluster.instance()
    assert instance["metadata"]["labels"][NODE_LABEL] == "node-1"
    assert instance["status"]["resize"]["flavor"] == {"vcpus": 2, "memoryMiB": 256}

    cluster.change(decision="Confirm")
    done = cluster.run()
    assert done["status"]["phase"] == "Succeeded" and done["status"]["message"].startswith("confirmed")
    assert not cluster.source.node.driver.instance_exists(cluster.uid)


def test_a_cold_migration_reverted_runs_the_original_again(cluster: Cluster) -> None:
    cluster.start("Cold", confirmation={"policy": "Manual"})
    cluster.run()
    cluster.change(decision="Revert")
    done = cluster.run()
    assert done["status"]["phase"] == "Reverted"
    assert cluster.source.node.state(cluster.uid) is PowerState.RUNNING
    assert not cluster.target.node.driver.instance_exists(cluster.uid)
    assert cluster.instance()["metadata"]["labels"][NODE_LABEL] == "node-0"


def test_an_auto_confirmation_waits_for_its_deadline(cluster: Cluster) -> None:
    cluster.start("Cold", confirmation={"policy": "Auto", "autoConfirmSeconds": 300})
    waiting = cluster.run()
    assert "confirms itself at" in waiting["status"]["message"]
    later = [delay for key, delay in cluster.source.node.queue.later if key[0] == "migration"]
    assert later and 290 < later[-1] <= 300.1  # asked for again at the deadline
    assert cluster.source.node.driver.instance_exists(cluster.uid)


def test_a_cold_migration_cancelled_before_it_starts_changes_nothing(cluster: Cluster) -> None:
    cluster.start("Cold", cancel=True)
    done = cluster.run()
    assert done["status"]["phase"] == "Cancelled"
    assert cluster.source.node.state(cluster.uid) is PowerState.RUNNING


class ForgedHandoff(MemoryStatusWriter):
    """A hostile writer of the hand-off: the disks it names are another instance's, the source URI
    another host's."""

    def write(
        self, body: Mapping[str, Any], patch: Mapping[str, Any], guard: bool = False
    ) -> Mapping[str, Any] | None:
        handoff = patch.get("handoff") or {}
        if handoff.get("disks"):
            patch = {
                **patch,
                "handoff": {**handoff, "disks": ["/var/lib/kubenova/instances/someone-else/disk"]},
            }
        return super().write(body, patch, guard)


def test_a_forged_cold_hand_off_is_refused_and_the_original_runs_again(tmp_path: pathlib.Path) -> None:
    cluster = Cluster(tmp_path, writer=ForgedHandoff)
    cluster.start("Cold")
    done = cluster.run()
    assert done["status"]["phase"] == "Failed", done["status"]
    assert "refused the source's hand-off" in done["status"]["message"]
    assert not cluster.target.node.driver.instance_exists(cluster.uid)
    assert cluster.source.node.state(cluster.uid) is PowerState.RUNNING
    assert cluster.instance()["metadata"]["labels"][NODE_LABEL] == "node-0"


def test_the_target_fetches_from_the_uri_the_source_publishes_not_the_hand_off(cluster: Cluster) -> None:
    cluster.start("Cold")
    status = cluster.api.objects[(MIGRATIONS, "ns", "m")]["status"]
    status["handoff"]["sourceURI"] = "fake://a-host-of-the-attackers-choice"
    waiting = cluster.run()
    assert waiting["status"]["phase"] == "AwaitingConfirmation", waiting["status"]
    assert cluster.target.node.state(cluster.uid) is PowerState.RUNNING


def test_a_migration_ended_without_its_target_drops_what_the_target_prepared(cluster: Cluster) -> None:
    """The controller ends a Migration whose target stopped answering in PrepareTarget; the target, back,
    finds its hand-over refused (the Migration changed meanwhile) and then drops its preparation."""
    cluster.start("Live")
    target = cluster.target
    body = target.node.migrations.seen(
        None, copy.deepcopy(cluster.migration())
    )  # what the frozen target holds
    stored = cluster.api.objects[(MIGRATIONS, "ns", "m")]
    stored["status"].update({"phase": "Failed", "step": "Done", "message": "the target is unreachable"})
    cluster.api.touch(stored)  # the controller's guarded write, while the target was frozen
    target.migrations.handle(body)  # the target acts on its stale copy: prepares, and its write is refused
    assert cluster.migration()["status"]["phase"] == "Failed"
    assert cluster.uid in target.node.driver._prepared  # noqa: SLF001 (prepared, then refused)
    target.node.migrations.seen(None, cluster.migration())
    target.migrations.handle(body)
    assert cluster.uid not in target.node.driver._prepared  # noqa: SLF001
    assert not target.node.driver.instance_exists(cluster.uid)


def test_an_old_migration_ending_late_leaves_a_newer_ones_preparation(cluster: Cluster) -> None:
    """A target that was away sees the old Migration's end only after a newer Migration of the same
    instance to it is under way: what is prepared here is the newer one's and stays."""
    cluster.start("Live")
    target = cluster.target
    stored = cluster.api.objects[(MIGRATIONS, "ns", "m")]
    stored["status"].update({"phase": "Failed", "step": "Done", "message": "the target is unreachable"})
    newer = copy.deepcopy(stored)
    newer["metadata"].update({"name": "again", "uid": "uid-again"})
    newer["status"].update({"phase": "Scheduling", "step": "PrepareTarget", "message": ""})
    target.node.migrations.seen(None, cluster.api.add(MIGRATIONS, newer))
    target.migrations.handle("uid-again")
    assert cluster.uid in target.node.driver._prepared  # noqa: SLF001 (the newer one prepared here)
    old = target.node.migrations.seen(None, cluster.api.touch(stored))
    target.migrations.handle(old)
    assert cluster.uid in target.node.driver._prepared  # noqa: SLF001 (kept for the newer one)
