"""The agent registers its host as a ComputeNode with stats that match the host."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import kubernetes

from kubenova.handlers.shared import COMPUTENODES, GROUP, VERSION, VIRTUALINSTANCES
from testground import ground as testground
from testground import libvirt_host
from tests.helpers import eventually
from tests.integration.test_virtualinstance import cond, get, make


def meminfo_mib() -> int:
    line = next(
        row for row in pathlib.Path("/proc/meminfo").read_text().splitlines() if row.startswith("MemTotal:")
    )
    return int(line.split()[1]) // 1024


def test_capacity_matches_the_host_and_instances_are_counted(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    node = custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, ground.node)
    status = node["status"]
    assert status["capacity"]["vcpus"] == os.cpu_count()
    assert abs(status["capacity"]["memoryMiB"] - meminfo_mib()) <= 1
    fs = os.statvfs(ground.node_dir())
    assert status["capacity"]["diskGiB"] == fs.f_blocks * fs.f_frsize // 2**30
    assert status["hypervisorType"] == "QEMU" and status["cpuInfo"]["arch"] == "x86_64"
    assert status["cpuInfo"]["features"], "the host CPU's feature flags are reported"
    # Measured, not capacity minus instances: the host's own use counts too.
    assert 0 < status["memoryFreeMiB"] < status["capacity"]["memoryMiB"]
    # Never more than the plain free space: copy-on-write disks may still grow into it.
    assert status["diskAvailableLeastGiB"] <= (fs.f_bavail * fs.f_frsize) // 2**30 + 1

    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, make("counted"))
    eventually(
        lambda: cond(get(custom, namespace, "counted"), "Ready").get("status") == "True",
        timeout=120,
        what="Running",
    )
    # The next heartbeat (every 20 s) lists it.
    node = eventually(
        lambda: (
            (n := custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, ground.node))
            and f"{namespace}/counted" in n["status"].get("instances", [])
            and n
        ),
        timeout=45,
        interval=1,
        what="the instance in the ComputeNode's status",
    )
    assert node["status"]["instanceCount"] == len(node["status"]["instances"])
    assert node["status"]["usage"]["memoryMiB"] >= 96
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, "counted")
    eventually(lambda: get(custom, namespace, "counted") is None, timeout=60, what="deletion")


def test_a_network_opened_in_the_computenode_starts_the_instance_that_waited_for_it(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    """The cluster admin's allow-list lives in the ComputeNode too (it replaces the agent's flags) and
    takes effect at once: a refused instance starts when its network is opened, without a spec change."""
    closed = {"default": ["default"]}
    opened = {"default": ["default"], "namespaces": {namespace: [libvirt_host.NETWORK]}}

    def networks(value: dict[str, Any] | None) -> None:
        custom.patch_cluster_custom_object(
            GROUP, VERSION, COMPUTENODES, ground.node, {"spec": {"networks": value}}
        )

    networks(closed)
    try:
        body = make("waits", interfaces=[{"name": "eth0", "network": libvirt_host.NETWORK}])
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)
        failed = eventually(
            lambda: (
                (o := get(custom, namespace, "waits")) and o.get("status", {}).get("phase") == "Failed" and o
            ),
            timeout=60,
            what="the instance to be refused its network",
        )
        message = cond(failed, "Ready")["message"]
        assert "spec.interfaces[0].network" in message and "ComputeNode's spec.networks" in message, message
        networks(opened)
        eventually(
            lambda: (get(custom, namespace, "waits") or {}).get("status", {}).get("phase") == "Running",
            timeout=90,
            what="the instance to start once its network is open",
        )
    finally:
        networks(None)
