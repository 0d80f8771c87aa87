"""An agent killed in the middle of a migration, ten times at each of its riskiest points.

The points: inside the live transfer (its progress callback: libvirtd goes on with the job
without the agent), after the target prepared, after the source powered off (cold), and after
the confirmation (cold). Each time the agent that stopped there is killed with SIGKILL and
started again, as a DaemonSet would. After each migration exactly one copy of the guest runs,
on the node its status names; a live migration never boots the guest again, and a cold one
boots it once on the node it lands on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import kubernetes
import pytest

from kubenova.handlers.shared import COMPUTENODES, GROUP, MIGRATIONS, NODE_LABEL, VERSION, VIRTUALINSTANCES
from testground import ground as testground
from testground import guest
from tests.faults import chaos
from tests.faults.conftest import KILL_RESULTS
from tests.faults.test_fault_matrix import PAIR, POOL, Run, domains, kernel_vm, running
from tests.helpers import eventually
from tests.integration.test_agent import delete_and_wait
from tests.integration.test_virtualinstance import cond, get

pytestmark = pytest.mark.long

KILLS = 10
FINAL = ("Succeeded", "Failed", "Cancelled", "Reverted")
#: (crash point, migration type): where the agent dies, in which kind of migration.
POINTS = (
    ("transfer.progress", "Live"),
    ("migration.PrepareTarget", "Live"),
    ("migration.PowerOffSource", "Cold"),
    ("migration.AwaitConfirmation", "Cold"),
)


@pytest.fixture(scope="module")
def pair(ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi) -> Iterator[None]:
    for node in PAIR:
        testground.add_node(ground, node)
        custom.patch_cluster_custom_object(
            GROUP, VERSION, COMPUTENODES, node, {"metadata": {"labels": {POOL: "pair"}}}
        )
    yield
    for node in PAIR:
        testground.remove_node(ground, node)


def boots(run: Run, node: str) -> int:
    return run.console(node).count(guest.BOOT_MARKER)


def last_tick(run: Run, node: str) -> int:
    found = re.findall(rf"{guest.TICK} (\d+)", run.console(node))
    return int(found[-1]) if found else 0


def running_copies(run: Run) -> list[str]:
    return [node for node in PAIR if domains(run.ground, node).get(run.uid) == "running"]


def one_migration(run: Run, point: str, kind: str, index: int) -> str:
    """Arm ``point``, migrate to the other node, kill the agent that stopped there, revive it; returns the
    Migration's final phase once the instance is Ready where its status says, running there only, and
    booted as the kind says: a live migration goes on counting where the guest was (no new boot), a
    cold one boots it exactly once where it lands."""
    source = run.instance()["metadata"]["labels"][NODE_LABEL]
    booted, tick = boots(run, source), last_tick(run, source)
    target = PAIR[1] if source == PAIR[0] else PAIR[0]
    spec: dict[str, object] = {"instanceRef": {"name": run.name}, "type": kind, "targetNode": target}
    if kind == "Live":
        spec["bandwidthMiBps"] = 16  # a transfer of some seconds, so the progress callback runs
    else:
        spec["confirmation"] = {"policy": "Auto", "autoConfirmSeconds": 0}
    name = f"move-{index}"
    chaos.arm(run.ground, point)
    run.create(
        MIGRATIONS,
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Migration", "metadata": {"name": name}, "spec": spec},
    )
    stopped = chaos.wait_reached(run.ground, point, [f"agent-{n}" for n in PAIR])
    chaos.strike(run.ground, stopped, "agent")
    done = eventually(
        lambda: (
            (m := run.custom.get_namespaced_custom_object(GROUP, VERSION, run.namespace, MIGRATIONS, name))
            .get("status", {})
            .get("phase")
            in FINAL
            and m
        ),
        timeout=240,
        what=f"Migration {name} to end",
    )
    obj = eventually(
        lambda: (
            (o := get(run.custom, run.namespace, run.name))
            and cond(o, "Ready").get("status") == "True"
            and o["status"].get("node") == o["metadata"]["labels"][NODE_LABEL]
            and o
        ),
        timeout=240,
        what="the instance Ready where its status says",
    )
    node = obj["metadata"]["labels"][NODE_LABEL]
    assert running_copies(run) == [node], f"{point} #{index}: copies running: {running_copies(run)}"
    said = f"{point} #{index} ({done['status']['phase']}, on {node})"
    if kind == "Live":
        eventually(lambda: last_tick(run, node) > tick, timeout=60, what=f"{said}: the guest counting on")
        assert boots(run, node) == (booted if node == source else 0), f"{said}: booted again"
    else:
        eventually(
            lambda: boots(run, node) == (booted + 1 if node == source else 1),
            timeout=120,
            what=f"{said}: one new boot",
        )
        time.sleep(1)
        assert boots(run, node) == (booted + 1 if node == source else 1), f"{said}: booted twice"
    run.custom.delete_namespaced_custom_object(GROUP, VERSION, run.namespace, MIGRATIONS, name)
    return str(done["status"]["phase"])


@pytest.mark.parametrize(("point", "kind"), POINTS, ids=[p for p, _ in POINTS])
def test_an_agent_killed_mid_migration_ten_times_leaves_one_guest(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    pair: None,
    point: str,
    kind: str,
) -> None:
    run = Run(ground, custom, namespace)
    running(run, kernel_vm(run, "pair"))
    eventually(
        lambda: last_tick(run, run.instance()["metadata"]["labels"][NODE_LABEL]) > 0,
        timeout=120,
        what="the guest to boot and count",
    )
    phases, started = [], time.monotonic()
    for index in range(KILLS):
        phases.append(one_migration(run, point, kind, index))
    seconds = time.monotonic() - started
    KILL_RESULTS.append(
        f"migration kills at {point}: {KILLS} of {KILLS} left one guest; outcomes "
        + ", ".join(f"{p} {phases.count(p)}" for p in sorted(set(phases)))
        + f"; {seconds / KILLS:.1f} s per kill"
    )
    delete_and_wait(custom, namespace, run.name)
    for node in PAIR:
        assert run.uid not in domains(ground, node), f"a leaked domain on {node}"
        assert not ground.instance_dir(run.uid, node).exists(), f"leaked files on {node}"
    assert not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES)["items"]
