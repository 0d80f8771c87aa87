"""A live Migration's target finishes it as soon as the guest has arrived, not after the source's
libvirtd has stopped its copy and its agent has said so; post-copy still waits for the source, a guest
not yet arrived is waited for, the source's leftovers go even when its agent died before its end, and a
migration straight back waits for the last copy to leave."""

from __future__ import annotations

import pathlib
import threading
import time

import pytest

from kubenova.driver.base import ALLOW_ALL, PowerState
from kubenova.handlers.shared import MIGRATIONS, NODE_LABEL
from tests.unit.test_reconcile_migrations import Cluster, transferred_behind_the_agents_back


@pytest.fixture
def cluster(tmp_path: pathlib.Path) -> Cluster:
    return Cluster(tmp_path)


def arrival_told(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake hypervisor cannot tell an arrival (its default answer); here it says what libvirt's would:
    the guest runs on the target."""
    target = cluster.target.node.driver
    monkeypatch.setattr(
        target,
        "live_migration_arrived",
        lambda uid: target.instance_exists(uid) and target.get_info(uid).state is PowerState.RUNNING,
    )


def target_sees(cluster: Cluster) -> None:
    cluster.target.migrations.handle(cluster.target.node.migrations.seen(None, cluster.migration()))


def test_the_target_finishes_once_the_guest_arrived_and_the_source_cleans_up_after(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    transferred_behind_the_agents_back(cluster, "Transferring")  # the source's agent has not said so yet
    arrival_told(cluster, monkeypatch)
    source = cluster.source.node.driver
    source.ensure_filtering_rules_for_instance(cluster.uid, ALLOW_ALL)  # what the source's end removes
    cluster.target.migrations.arriving(cluster.uid)  # the lifecycle event of the resumed guest
    assert ("migration", cluster.migration()["metadata"]["uid"]) in [
        k for k, _ in cluster.target.node.queue.later
    ]
    target_sees(cluster)
    done = cluster.migration()["status"]
    assert (done["phase"], done["step"]) == ("Succeeded", "Done"), done
    assert done["message"].startswith("moved from node-0 to node-1")
    assert cluster.instance()["metadata"]["labels"][NODE_LABEL] == "node-1"
    assert cluster.instance()["status"]["node"] == "node-1"
    # The source's agent, back (or its transfer call returned), finds the Migration final.
    cluster.run()
    assert source.filtering_rules(cluster.uid) == ()
    assert not source.instance_exists(cluster.uid)
    assert cluster.target.node.state(cluster.uid) is PowerState.RUNNING


def test_a_guest_not_yet_arrived_is_waited_for(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster.start("Live")
    target_sees(cluster)  # prepared: the hand-over says Transfer
    arrival_told(cluster, monkeypatch)
    stored = cluster.api.objects[(MIGRATIONS, "ns", "m")]
    stored["status"]["step"] = "Transferring"
    cluster.api.touch(stored)
    target_sees(cluster)
    assert cluster.migration()["status"]["step"] == "Transferring"
    assert cluster.instance()["metadata"]["labels"][NODE_LABEL] == "node-0"


def test_a_transfer_in_post_copy_waits_for_the_source(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    transferred_behind_the_agents_back(cluster, "Transferring")
    arrival_told(cluster, monkeypatch)
    stored = cluster.api.objects[(MIGRATIONS, "ns", "m")]
    stored["status"]["progress"] = {"mode": "PostCopy"}
    cluster.api.touch(stored)
    target_sees(cluster)
    assert cluster.migration()["status"]["step"] == "Transferring"


def test_a_migration_straight_back_waits_for_the_last_copy_to_leave(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """node-0's own transfer of the guest is still ending (its worker holds it) when a migration back
    to node-0 asks it to prepare: it waits for that end instead of failing on the copy still there."""
    transferred_behind_the_agents_back(cluster, "Transferring")
    arrival_told(cluster, monkeypatch)
    target_sees(cluster)
    assert cluster.migration()["status"]["phase"] == "Succeeded"
    live = cluster.source.migrations.live
    live._transfers["the-last-one"] = cluster.uid  # noqa: SLF001 (its transfer call has not returned)
    threading.Timer(0.3, live._transfers.pop, ("the-last-one",)).start()  # noqa: SLF001
    stored = cluster.api.objects[(MIGRATIONS, "ns", "m")]
    stored["metadata"]["uid"] = "uid-back"
    stored["status"].update(
        {"phase": "Scheduling", "step": "PrepareTarget", "sourceNode": "node-1", "targetNode": "node-0"}
    )
    started = time.monotonic()
    cluster.source.migrations.handle(cluster.source.node.migrations.seen(None, cluster.api.touch(stored)))
    assert time.monotonic() - started >= 0.3
    back = cluster.migration()["status"]
    assert (back["phase"], back["step"]) == ("Migrating", "Transfer"), back
