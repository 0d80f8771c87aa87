"""The fault matrix: every step × every component killed at it, then convergence and no leaks.

For each step kubenova stops at the crash point where the step's work is done but not yet
recorded in the apiserver; the test kills one of agent, controller, libvirtd, kube-apiserver,
etcd there, revives it (as a DaemonSet, a Deployment or systemd would), and then checks what a
user would: the object converges, there is exactly one domain for it on exactly the node its
status names, the bytes the guest wrote are still on its volume, and after the delete no
domain, overlay, config drive or finalizer is left anywhere.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import libvirt
import pytest

from kubenova.handlers.shared import (
    COMPUTENODES,
    GROUP,
    MIGRATIONS,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    VOLUMEATTACHMENTS,
)
from testground import ground as testground
from testground import guest, libvirt_host
from tests.faults import chaos
from tests.faults.conftest import RESULTS
from tests.helpers import eventually
from tests.integration.test_agent import patch_spec, wait_action, wait_ready
from tests.integration.test_virtualinstance import cond, get, make

pytestmark = pytest.mark.long

POOL = "faults.kubenova.io/pool"
SINGLE, PAIR = ("node-0",), ("node-1", "node-2")
CONVERGE = 240


@pytest.fixture(scope="module")
def nodes(ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi) -> Iterator[None]:
    """node-0 runs the one-node steps, node-1 and node-2 the migrations; a label keeps them apart."""
    for node in PAIR:
        testground.add_node(ground, node)
    for node, pool in ((SINGLE[0], "single"), *((n, "pair") for n in PAIR)):
        custom.patch_cluster_custom_object(
            GROUP, VERSION, COMPUTENODES, node, {"metadata": {"labels": {POOL: pool}}}
        )
    yield
    for node in PAIR:
        testground.remove_node(ground, node)
    custom.patch_cluster_custom_object(
        GROUP, VERSION, COMPUTENODES, SINGLE[0], {"metadata": {"labels": {POOL: None}}}
    )


@dataclasses.dataclass
class Run:
    ground: testground.Ground
    custom: kubernetes.client.CustomObjectsApi
    namespace: str
    name: str = "vm"
    uid: str = ""
    pattern: str = dataclasses.field(default_factory=lambda: f"KNF-{uuid.uuid4().hex[:12]}")
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, body))

    def instance(self) -> dict[str, Any]:
        obj = get(self.custom, self.namespace, self.name)
        assert obj is not None
        return obj

    def console(self, node: str) -> str:
        path = self.ground.console_log(self.uid, node)
        return path.read_text(errors="replace") if path.exists() else ""


# --- libvirt and the node's files, as the test sees them ---------------------------------------


def domains(ground: testground.Ground, node: str) -> dict[str, str]:
    """Every domain of the node's libvirtd: UUID -> state."""
    conn = libvirt.open(libvirt_host.uri(ground.layout, node))
    try:
        return {d.UUIDString(): ("running" if d.isActive() else "shut off") for d in conn.listAllDomains()}
    finally:
        conn.close()


def where(ground: testground.Ground, uid: str, nodes: tuple[str, ...]) -> list[str]:
    return [node for node in nodes if uid in domains(ground, node)]


def volume_xml(ground: testground.Ground, node: str, uid: str) -> str:
    conn = libvirt.open(libvirt_host.uri(ground.layout, node))
    try:
        return str(conn.lookupByUUIDString(uid).XMLDesc())
    finally:
        conn.close()


# --- the steps -------------------------------------------------------------------------------


def image_vm(run: Run, **spec: Any) -> dict[str, Any]:
    """An image boot with a root overlay and a config drive: the files a leak would leave behind."""
    return make(
        run.name,
        boot={"image": {"name": guest.DISK_IMAGE}},
        rootDisk={"sizeGiB": 1},
        userData="#cloud-config\nhostname: fault\n",
        nodeSelector={POOL: "single"},
        **spec,
    )


def kernel_vm(run: Run, pool: str, hook: str | None = None) -> dict[str, Any]:
    cmdline = f"{guest.CMDLINE} {guest.write_hook(hook, run.pattern)}" if hook else guest.CMDLINE
    body = make(run.name, nodeSelector={POOL: pool})
    body["spec"]["boot"]["kernel"]["cmdline"] = cmdline
    return body


def running(run: Run, body: dict[str, Any]) -> None:
    run.uid = run.create(VIRTUALINSTANCES, body)["metadata"]["uid"]
    wait_ready(run.custom, run.namespace, run.name, timeout=CONVERGE)


def ready_once(run: Run, nodes: tuple[str, ...], power: str = "Running") -> str:
    """Ready with the wanted power state, and one domain, on the node the status names; returns that node."""
    wait_ready(run.custom, run.namespace, run.name, power, timeout=CONVERGE)
    # Ready may still be the old node's word: converged means the status names the bound node.
    obj = eventually(
        lambda: (
            (o := run.instance())["status"].get("node") == o["metadata"]["labels"][NODE_LABEL]
            and o["status"].get("powerState") == power
            and cond(o, "Ready").get("status") == "True"
            and o
        ),
        timeout=CONVERGE,
        what="the status to name the node the instance is bound to",
    )
    run.uid = obj["metadata"]["uid"]
    node = obj["metadata"]["labels"][NODE_LABEL]
    assert where(run.ground, run.uid, nodes) == [node], "exactly one domain, on the instance's node"
    return str(node)


def booted(run: Run, node: str) -> None:
    eventually(lambda: guest.BOOT_MARKER in run.console(node), timeout=CONVERGE, what="the boot marker")


def va(run: Run) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VolumeAttachment",
        "metadata": {"name": "data"},
        "spec": {"instanceRef": {"name": run.name}, "volume": {"name": f"vol-{run.namespace}", "sizeGiB": 1}},
    }


def volume_holds_pattern(run: Run) -> bool:
    with open(run.ground.volume_store(SINGLE[0]) / run.namespace / f"vol-{run.namespace}", "rb") as f:
        return f.read(len(run.pattern)) == run.pattern.encode()


def attachment(run: Run) -> dict[str, Any] | None:
    try:
        return dict(
            run.custom.get_namespaced_custom_object(GROUP, VERSION, run.namespace, VOLUMEATTACHMENTS, "data")
        )
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def attached(run: Run) -> None:
    eventually(
        lambda: ((attachment(run) or {}).get("status") or {}).get("phase") == "Attached",
        timeout=CONVERGE,
        what="the VolumeAttachment Attached",
    )
    eventually(
        lambda: f"{guest.WROTE} vda {run.pattern}" in run.console(SINGLE[0]),
        timeout=CONVERGE,
        what="the guest writing its pattern to the volume",
    )
    assert volume_holds_pattern(run), "the volume holds the bytes the guest wrote"
    assert str(run.ground.volume_store(SINGLE[0]) / run.namespace / f"vol-{run.namespace}") in volume_xml(
        run.ground, SINGLE[0], run.uid
    )


def migration(run: Run) -> dict[str, Any]:
    return dict(run.custom.get_namespaced_custom_object(GROUP, VERSION, run.namespace, MIGRATIONS, "move"))


def migrate(run: Run, kind: str) -> None:
    source = run.extra["source"]
    spec: dict[str, Any] = {
        "instanceRef": {"name": run.name},
        "type": kind,
        "targetNode": PAIR[1] if source == PAIR[0] else PAIR[0],
    }
    if kind == "Cold":
        spec["confirmation"] = {"policy": "Auto", "autoConfirmSeconds": 0}
    run.create(
        MIGRATIONS,
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Migration", "metadata": {"name": "move"}, "spec": spec},
    )


def migrated(run: Run, phases: tuple[str, ...]) -> None:
    done = eventually(
        lambda: (
            (m := migration(run)).get("status", {}).get("phase")
            in ("Succeeded", "Failed", "Cancelled", "Reverted")
            and m
        ),
        timeout=CONVERGE,
        what="the Migration to end",
    )
    assert done["status"]["phase"] in phases, done["status"]
    node = ready_once(run, PAIR)
    expected = done["status"]["targetNode"] if done["status"]["phase"] == "Succeeded" else run.extra["source"]
    assert node == expected, (node, done["status"])
    other = PAIR[1] if node == PAIR[0] else PAIR[0]
    assert not run.ground.instance_dir(run.uid, other).exists(), (
        "nothing of the instance is left on the other node"
    )


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    point: str
    nodes: tuple[str, ...]
    prepare: Callable[[Run], None]
    act: Callable[[Run], None]
    converged: Callable[[Run], None]


def _nothing(run: Run) -> None:
    pass


def _create_image_vm(run: Run) -> None:
    run.uid = run.create(VIRTUALINSTANCES, image_vm(run))["metadata"]["uid"]


def _created(run: Run) -> None:
    booted(run, ready_once(run, SINGLE))


def _stop(run: Run) -> None:
    patch_spec(run.custom, run.namespace, run.name, {"powerState": "Stopped"})


def _stopped(run: Run) -> None:
    node = ready_once(run, SINGLE, "Stopped")
    assert domains(run.ground, node)[run.uid] == "shut off"


def _snapshot(run: Run) -> None:
    run.extra["image"] = f"snap-{run.namespace}.qcow2"
    patch_spec(
        run.custom,
        run.namespace,
        run.name,
        {"actions": {"snapshot": {"id": "s1", "imageName": run.extra["image"]}}},
    )


def _snapshotted(run: Run) -> None:
    ack = wait_action(run.custom, run.namespace, run.name, "snapshot", "s1", timeout=CONVERGE)
    assert ack["phase"] == "Succeeded", ack
    image = run.ground.snapshots(run.namespace) / run.extra["image"]
    assert image.stat().st_size > 0
    image.unlink()  # the test made it: the test removes it
    ready_once(run, SINGLE)


def _delete(run: Run) -> None:
    run.custom.delete_namespaced_custom_object(GROUP, VERSION, run.namespace, VIRTUALINSTANCES, run.name)


def _deleted(run: Run) -> None:
    eventually(
        lambda: get(run.custom, run.namespace, run.name) is None,
        timeout=CONVERGE,
        what="the instance gone (its finalizer released)",
    )


def _volume_vm(run: Run) -> None:
    running(run, kernel_vm(run, "single", hook="vda"))


def _attach(run: Run) -> None:
    run.create(VOLUMEATTACHMENTS, va(run))


def _attached_vm(run: Run) -> None:
    _volume_vm(run)
    _attach(run)
    attached(run)


def _detach(run: Run) -> None:
    run.custom.delete_namespaced_custom_object(GROUP, VERSION, run.namespace, VOLUMEATTACHMENTS, "data")


def _detached(run: Run) -> None:
    eventually(lambda: attachment(run) is None, timeout=CONVERGE, what="the VolumeAttachment gone")
    assert f"vol-{run.namespace}" not in volume_xml(run.ground, SINGLE[0], run.uid)
    assert volume_holds_pattern(run), "detaching kept the volume and its bytes"
    ready_once(run, SINGLE)


def _pair_vm(run: Run) -> None:
    running(run, kernel_vm(run, "pair"))
    run.extra["source"] = run.instance()["metadata"]["labels"][NODE_LABEL]
    eventually(
        lambda: f"{guest.TICK} 1" in run.console(run.extra["source"]),
        timeout=CONVERGE,
        what="the guest ticking",
    )


def _live_migrated(run: Run) -> None:
    migrated(run, ("Succeeded", "Failed"))
    node = run.instance()["metadata"]["labels"][NODE_LABEL]
    start = len(re.findall(guest.TICK, run.console(node)))
    eventually(
        lambda: len(re.findall(guest.TICK, run.console(node))) > start,
        timeout=60,
        what="the guest still ticking",
    )
    boots = run.console(node).count(guest.BOOT_MARKER)
    assert boots == (1 if node == run.extra["source"] else 0), "a live migration never restarts the guest"


STEPS = [
    Step("create (controller binds)", "placement.chosen", SINGLE, _nothing, _create_image_vm, _created),
    Step("create (agent defined the domain)", "spawn.defined", SINGLE, _nothing, _create_image_vm, _created),
    Step("power off", "power.stopped", SINGLE, lambda r: running(r, image_vm(r)), _stop, _stopped),
    Step("attach", "volume.attached", SINGLE, _volume_vm, _attach, attached),
    Step("detach", "volume.detached", SINGLE, _attached_vm, _detach, _detached),
    Step("snapshot", "snapshot.written", SINGLE, lambda r: running(r, image_vm(r)), _snapshot, _snapshotted),
    Step("delete", "delete.destroyed", SINGLE, lambda r: running(r, image_vm(r)), _delete, _deleted),
    Step(
        "cold migration (target finished)",
        "migration.FinishTarget",
        PAIR,
        _pair_vm,
        lambda r: migrate(r, "Cold"),
        lambda r: migrated(r, ("Succeeded",)),
    ),
    Step(
        "live migration (transferred)",
        "migration.Transferring",
        PAIR,
        _pair_vm,
        lambda r: migrate(r, "Live"),
        _live_migrated,
    ),
]


def no_leaks(run: Run, nodes: tuple[str, ...]) -> None:
    """After the delete: no object, no finalizer, no domain and no file of the instance on any node."""
    for plural in (MIGRATIONS, VOLUMEATTACHMENTS, VIRTUALINSTANCES):
        for obj in run.custom.list_namespaced_custom_object(GROUP, VERSION, run.namespace, plural)["items"]:
            run.custom.delete_namespaced_custom_object(
                GROUP, VERSION, run.namespace, plural, obj["metadata"]["name"]
            )
        eventually(
            lambda p=plural: (
                not run.custom.list_namespaced_custom_object(GROUP, VERSION, run.namespace, p)["items"]
            ),
            timeout=CONVERGE,
            what=f"every {plural} of the case gone (finalizers released)",
        )
    for node in nodes:
        assert run.uid not in domains(run.ground, node), f"a leaked domain on {node}"
        assert not run.ground.instance_dir(run.uid, node).exists(), f"leaked disks or config drive on {node}"
    volume = run.ground.volume_store(SINGLE[0]) / run.namespace / f"vol-{run.namespace}"
    volume.unlink(missing_ok=True)  # the test's volume: kubenova never deletes one


def known_domains_only(ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi) -> None:
    """Across the whole test ground: every domain belongs to a VirtualInstance bound to its node."""
    bound = {
        (o["metadata"]["uid"], (o["metadata"].get("labels") or {}).get(NODE_LABEL))
        for o in custom.list_cluster_custom_object(GROUP, VERSION, VIRTUALINSTANCES)["items"]
    }
    for node in (*SINGLE, *PAIR):
        for uid in domains(ground, node):
            assert (uid, node) in bound, f"domain {uid} on {node} belongs to no VirtualInstance there"


@pytest.mark.parametrize("component", chaos.COMPONENTS)
@pytest.mark.parametrize("step", STEPS, ids=[s.point for s in STEPS])
def test_kill_at_step_converges_without_leaks(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: None,
    step: Step,
    component: str,
) -> None:
    run = Run(ground, custom, namespace)
    step.prepare(run)
    chaos.arm(ground, step.point)
    step.act(run)
    names = ["controller", *(f"agent-{node}" for node in step.nodes)]
    stopped = chaos.wait_reached(ground, step.point, names)
    try:
        killed = time.monotonic()
        chaos.strike(ground, stopped, component)
        step.converged(run)
        RESULTS[(step.name, component)] = f"{time.monotonic() - killed:.1f} s"
    except BaseException:
        RESULTS[(step.name, component)] = "failed"
        raise
    no_leaks(run, step.nodes)
    known_domains_only(ground, custom)
