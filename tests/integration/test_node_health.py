"""Node failures, through the Kubernetes API and two real libvirtd hosts (node-3, node-4).

A lost node (its agent and libvirtd frozen, then the host powered off) makes its objects
Ready=Unknown and changes nothing else until an admin fences it; then its instance starts on the
other node with a new boot, and at no moment do two copies run. A libvirtd that stops answering
makes the node Ready=False, keeps new instances away and fails the agent's readiness probe, and
everything recovers when it answers again. A Migration whose target died before it prepared ends
Failed and frees its slot.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import kubernetes
import libvirt
import pytest

from kubenova.handlers.shared import COMPUTENODES, GROUP, NODE_LABEL, VERSION, VIRTUALINSTANCES
from testground import ground as testground
from testground import guest, libvirt_host, procs
from tests.helpers import eventually
from tests.integration.test_agent import delete_and_wait, wait_ready
from tests.integration.test_migration import migrate, wait_phase
from tests.integration.test_virtualinstance import cond, get, make

NODES = ("node-3", "node-4")
POOL = "test.kubenova.io/pool"
#: The test nodes' heartbeat Lease: short, so a loss shows in seconds (the chart's default is 40 s).
LEASE = 10
#: The controller judges health every 2 s; ``NodeUnreachable`` is due within the Lease plus 10 s.
UNKNOWN_IN = LEASE + 10


@pytest.fixture(scope="module")
def nodes(ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi) -> Iterator[tuple[str, str]]:
    for node in NODES:
        testground.add_node(ground, node, "--lease-duration", str(LEASE))
        custom.patch_cluster_custom_object(
            GROUP, VERSION, COMPUTENODES, node, {"metadata": {"labels": {POOL: "health"}}}
        )
    yield NODES
    for node in NODES:
        thaw(ground, node)
        testground.remove_node(ground, node)


def vi(name: str, **spec: Any) -> dict[str, Any]:
    return make(name, nodeSelector={POOL: "health"}, **spec)


def pids(ground: testground.Ground, node: str) -> list[int]:
    """The node's agent and libvirtd."""
    found = [procs.running_pid(ground.layout, f"agent-{node}"), libvirt_host.daemon_pid(ground.layout, node)]
    return [pid for pid in found if pid]


def freeze(ground: testground.Ground, node: str) -> list[int]:
    frozen = pids(ground, node)
    assert len(frozen) == 2, f"the agent and libvirtd of {node} should run: {frozen}"
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    return frozen


def thaw(ground: testground.Ground, node: str) -> None:
    for pid in pids(ground, node):
        os.kill(pid, signal.SIGCONT)


def node_ready(custom: kubernetes.client.CustomObjectsApi, node: str) -> dict[str, Any]:
    return cond(custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, node), "Ready")


def qemu_runs(uid: str) -> bool:
    """A QEMU process of this guest runs on this machine (any host of the test ground)."""
    return subprocess.run(["pgrep", "-f", f"qemu.*{uid}"], capture_output=True).returncode == 0


def active_on(ground: testground.Ground, node: str, uid: str) -> bool:
    conn = libvirt.open(libvirt_host.uri(ground.layout, node))
    try:
        return bool(conn.lookupByUUIDString(uid).isActive())
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def boots(ground: testground.Ground, uid: str, node: str) -> int:
    path = ground.console_log(uid, node)
    return path.read_text(errors="replace").count(guest.BOOT_MARKER) if path.exists() else 0


class CopyCounter:
    """Counts, every 0.2 s, the running copies of a guest: its QEMU processes (the frozen or dead node's
    libvirtd cannot be asked) and whether libvirt on the live node runs it. Records the most seen."""

    def __init__(self, ground: testground.Ground, live: str, uid: str) -> None:
        self.most, self.samples = 0, 0
        self._stop = threading.Event()

        def count() -> None:
            while not self._stop.is_set():
                found = subprocess.run(["pgrep", "-f", f"qemu.*{uid}"], capture_output=True, text=True)
                processes = len(found.stdout.split())
                self.most = max(self.most, processes, int(active_on(ground, live, uid)))
                self.samples += 1
                self._stop.wait(0.2)

        self._thread = threading.Thread(target=count, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_a_lost_node_is_unknown_until_fenced_then_its_instance_runs_elsewhere_once(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, vi("lost"))
    obj = wait_ready(custom, namespace, "lost")
    uid, lost = obj["metadata"]["uid"], obj["metadata"]["labels"][NODE_LABEL]
    live = NODES[1] if lost == NODES[0] else NODES[0]
    eventually(lambda: boots(ground, uid, lost) == 1, timeout=120, what="the guest to boot")

    freeze(ground, lost)
    frozen_at = time.monotonic()
    eventually(
        lambda: (
            cond(get(custom, namespace, "lost"), "Ready").get("reason") == "NodeUnreachable"
            and node_ready(custom, lost).get("status") == "Unknown"
        ),
        timeout=UNKNOWN_IN + 5,
        interval=0.5,
        what="Ready=Unknown (NodeUnreachable) on the instance and its node",
    )
    print(f"\nnode-health: Ready=Unknown {time.monotonic() - frozen_at:.1f} s after the node froze")
    assert cond(get(custom, namespace, "lost"), "Ready")["status"] == "Unknown"

    # Not fenced: a partitioned node may still run its guest, so nothing starts elsewhere.
    time.sleep(15)
    obj = get(custom, namespace, "lost")
    assert obj and obj["metadata"]["labels"][NODE_LABEL] == lost
    assert not active_on(ground, live, uid)

    # The host is powered off (libvirtd, virtlogd and QEMU killed), then an admin fences it.
    counter = CopyCounter(ground, live, uid)
    try:
        agent = procs.running_pid(ground.layout, f"agent-{lost}")
        assert agent
        os.kill(agent, signal.SIGKILL)  # a stopped process dies of SIGKILL too
        libvirt_host.stop(ground.layout, lost)
        assert not qemu_runs(uid)
        fenced_at = time.monotonic()
        custom.patch_cluster_custom_object(GROUP, VERSION, COMPUTENODES, lost, {"spec": {"fenced": True}})
        obj = eventually(
            lambda: (
                (o := get(custom, namespace, "lost"))
                and o["metadata"].get("labels", {}).get(NODE_LABEL) == live
                and cond(o, "Ready").get("status") == "True"
                and o
            ),
            timeout=120,
            interval=0.5,
            what=f"the instance Running on {live}",
        )
        eventually(lambda: boots(ground, uid, live) == 1, timeout=120, what=f"a new boot on {live}")
        print(f"node-health: running on {live} {time.monotonic() - fenced_at:.1f} s after the fence")
    finally:
        counter.stop()
    assert counter.samples >= 5 and counter.most == 1, f"copies seen at once: {counter.most}"
    assert obj["status"]["node"] == live

    # The host comes back fenced: its agent starts nothing, and the guest stays on the live node.
    testground.add_node(ground, lost, "--lease-duration", str(LEASE))
    time.sleep(5)
    assert not active_on(ground, lost, uid) and active_on(ground, live, uid)
    custom.patch_cluster_custom_object(GROUP, VERSION, COMPUTENODES, lost, {"spec": {"fenced": False}})
    delete_and_wait(custom, namespace, "lost")
    assert not active_on(ground, live, uid)


def readyz(node: str) -> int:
    port = testground.METRICS_PORT + int(node.rsplit("-", 1)[1])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_libvirtd_that_stops_answering_makes_the_node_not_ready_until_it_answers(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    node = NODES[0]
    assert readyz(node) == 200
    daemon = libvirt_host.daemon_pid(ground.layout, node)
    assert daemon
    os.kill(daemon, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        eventually(
            lambda: node_ready(custom, node).get("status") == "False",
            timeout=30,
            interval=0.5,
            what=f"{node} Ready=False",
        )
        print(f"\nnode-health: Ready=False {time.monotonic() - stopped_at:.1f} s after libvirtd stopped")
        assert node_ready(custom, node)["reason"] == "LibvirtUnreachable"
        eventually(lambda: readyz(node) == 503, timeout=30, what="the readiness probe to fail")
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, VIRTUALINSTANCES, vi("waits", nodeName=node)
        )
        eventually(
            lambda: "not ready" in cond(get(custom, namespace, "waits"), "Scheduled").get("message", ""),
            timeout=30,
            what="the pinned instance refused by placement",
        )
        time.sleep(max(0.0, 90 - (time.monotonic() - stopped_at)))
        assert NODE_LABEL not in (get(custom, namespace, "waits") or {})["metadata"].get("labels", {})
    finally:
        os.kill(daemon, signal.SIGCONT)
    eventually(
        lambda: node_ready(custom, node).get("status") == "True", timeout=60, what=f"{node} Ready again"
    )
    wait_ready(custom, namespace, "waits", timeout=120)
    assert readyz(node) == 200
    delete_and_wait(custom, namespace, "waits")


def test_a_migration_whose_target_died_before_preparing_fails_and_frees_its_slot(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, vi("stays"))
    source = wait_ready(custom, namespace, "stays")["metadata"]["labels"][NODE_LABEL]
    target = NODES[1] if source == NODES[0] else NODES[0]
    freeze(ground, target)
    try:
        migrate(custom, namespace, "to-the-dead", "stays", targetNode=target)
        done = wait_phase(custom, namespace, "to-the-dead", "Failed", timeout=LEASE + 60)
    finally:
        thaw(ground, target)
    message = done["status"]["message"]
    assert f"target {target} has been unreachable" in message and "stays on" in message, message
    # The slot is free (one migration per node at a time on the test ground): the next one runs.
    eventually(lambda: node_ready(custom, target).get("status") == "True", timeout=60, what="target back")
    migrate(custom, namespace, "again", "stays", targetNode=target)
    again = wait_phase(custom, namespace, "again", "Succeeded", "Failed", timeout=180)["status"]
    assert again["phase"] == "Succeeded", again.get("message")
    assert wait_ready(custom, namespace, "stays")["metadata"]["labels"][NODE_LABEL] == target
    delete_and_wait(custom, namespace, "stays")
