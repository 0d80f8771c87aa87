"""ComputeNode: the agent registers its host and keeps its heartbeat; the controller reads it."""
from __future__ import annotations

import asyncio
import logging

import kubernetes

from kubenova.driver.base import ComputeDriver
from kubenova.handlers.common import COMPUTENODES, GROUP, VERSION, now

log = logging.getLogger(__name__)
HEARTBEAT_INTERVAL = 20.0


def report_host(api: kubernetes.client.CustomObjectsApi, node: str, driver: ComputeDriver) -> None:
    """Create this node's ComputeNode if needed and write host stats and a heartbeat."""
    try:
        api.create_cluster_custom_object(GROUP, VERSION, COMPUTENODES, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ComputeNode", "metadata": {"name": node}, "spec": {}})
        log.info("registered ComputeNode %s", node)
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise
    stats = driver.get_host_stats()
    api.patch_cluster_custom_object_status(GROUP, VERSION, COMPUTENODES, node, {"status": {
        "hypervisorType": stats.hypervisor_type, "hypervisorVersion": stats.hypervisor_version,
        "hostname": stats.hostname, "cpuModel": stats.cpu_model, "heartbeatTime": now(),
        "capacity": {"vcpus": stats.vcpus, "memoryMiB": stats.memory_mib},
    }})


async def heartbeat(api: kubernetes.client.CustomObjectsApi, node: str, driver: ComputeDriver) -> None:
    """Keep the ComputeNode fresh so placement knows this agent is alive."""
    while True:
        await asyncio.sleep(HEARTBEAT_INTERVAL)
        try:
            await asyncio.to_thread(report_host, api, node, driver)
        except Exception as exc:  # keep beating through apiserver or libvirt hiccups
            log.warning("heartbeat of %s failed: %s", node, exc)
