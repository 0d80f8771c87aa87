"""libvirtd restarts and apiserver or etcd outages are survived by the running agent, without a restart."""

from __future__ import annotations

import os
import signal
import time

import kubernetes
import libvirt
import pytest

from kubenova.handlers.shared import COMPUTENODES, GROUP, VERSION, VIRTUALINSTANCES
from testground import ground as testground
from testground import kube, libvirt_host, procs
from tests.faults import chaos
from tests.helpers import eventually
from tests.integration.test_agent import patch_spec, wait_ready
from tests.integration.test_virtualinstance import cond, domain, get, make

pytestmark = pytest.mark.long

#: kopf's own retries give up after about 54 s (1+1+2+3+5+8+13+21); the outage outlasts them.
APISERVER_OUTAGE = 70


def node_ready(custom: kubernetes.client.CustomObjectsApi, node: str) -> dict[str, str]:
    return cond(custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, node), "Ready")


def test_libvirtd_restart_is_noticed_said_and_survived(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    agent = procs.running_pid(ground.layout, f"agent-{ground.node}")
    uid = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, make("steady"))[
        "metadata"
    ]["uid"]
    wait_ready(custom, namespace, "steady")
    libvirt_host.kill_daemon(ground.layout, ground.node)
    lost = eventually(
        lambda: (c := node_ready(custom, ground.node)).get("status") == "False" and c,
        timeout=30,
        what="the ComputeNode to say libvirt is unreachable",
    )
    assert lost["reason"] == "LibvirtUnreachable", lost
    libvirt_host.revive_daemon(ground.layout, ground.node)
    eventually(
        lambda: node_ready(custom, ground.node).get("reason") == "LibvirtConnected",
        timeout=30,
        what="the ComputeNode Ready again",
    )
    assert procs.running_pid(ground.layout, f"agent-{ground.node}") == agent, "the agent was not restarted"
    # The guest ran on through it (QEMU is not libvirtd's child), and events flow on the new connection:
    # a stop from outside shows within seconds, long before the 30 s resync would find it.
    conn = libvirt.open(ground.libvirt_uri)
    try:
        dom = domain(conn, uid)
        assert dom is not None and dom.isActive()
        dom.destroy()
    finally:
        conn.close()
    eventually(
        lambda: cond(get(custom, namespace, "steady"), "Ready").get("reason") == "StoppedOutsideKubernetes",
        timeout=10,
        what="the stop seen through libvirt's events",
    )
    wait_ready(custom, namespace, "steady")  # and started again after the restart delay
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, "steady")
    eventually(lambda: get(custom, namespace, "steady") is None, timeout=60, what="the instance deleted")


@pytest.mark.parametrize("component,outage", [("kube-apiserver", APISERVER_OUTAGE), ("etcd", 20)])
def test_the_agent_waits_out_an_apiserver_outage(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    component: str,
    outage: float,
) -> None:
    agent = procs.running_pid(ground.layout, f"agent-{ground.node}")
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, make("patient"))
    wait_ready(custom, namespace, "patient")
    pid = procs.running_pid(ground.layout, component)
    assert pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + outage  # the outage itself: the agent must live through all of it
    while time.monotonic() < deadline:
        assert procs.running_pid(ground.layout, f"agent-{ground.node}") == agent, "the agent gave up"
        time.sleep(1)
    if component == "etcd":
        kube.start_etcd(ground.layout, ground.tools)
    else:
        kube.start_apiserver(ground.layout, ground.tools, ground.layout.state / "pki")
    assert procs.running_pid(ground.layout, f"agent-{ground.node}") == agent, "the agent was not restarted"
    chaos.revive_kubenova(ground)  # the controller steps down when it cannot renew its leader Lease
    # The agent's watches resumed: a change made now reaches the domain.
    patch_spec(custom, namespace, "patient", {"powerState": "Stopped"})
    wait_ready(custom, namespace, "patient", "Stopped")
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, make("newcomer"))
    wait_ready(custom, namespace, "newcomer")
    assert procs.running_pid(ground.layout, f"agent-{ground.node}") == agent
    for name in ("patient", "newcomer"):
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, name)
        eventually(lambda n=name: get(custom, namespace, n) is None, timeout=60, what=f"{name} deleted")
