"""The agent registers its host as a ComputeNode with stats that match the host."""

from __future__ import annotations

import os
import pathlib

import kubernetes

from kubenova.handlers.shared import COMPUTENODES, GROUP, VERSION, VIRTUALINSTANCES
from testground import ground as testground
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
