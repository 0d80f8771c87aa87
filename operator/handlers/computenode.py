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
    instances = driver.list_instances_detail()
    cpu = stats.cpu
    api.patch_cluster_custom_object_status(GROUP, VERSION, COMPUTENODES, node, {"status": {
        "hypervisorType": stats.hypervisor_type, "hypervisorVersion": stats.hypervisor_version,
        "hostname": stats.hostname, "cpuModel": cpu.model, "heartbeatTime": now(),
        "cpuInfo": {"arch": cpu.arch, "vendor": cpu.vendor, "model": cpu.model, "sockets": cpu.sockets,
                    "cores": cpu.cores, "threads": cpu.threads, "features": list(cpu.features)},
        "capacity": {"vcpus": stats.vcpus, "memoryMiB": stats.memory_mib, "diskGiB": stats.disk_gib},
        "usage": {"vcpus": sum(i.vcpus for i in instances), "memoryMiB": sum(i.memory_mib for i in instances)},
        "diskAvailableLeastGiB": stats.disk_free_gib,
        "instanceCount": len(instances),
        "instances": sorted(f"{i.namespace}/{i.name}" for i in instances),
    }})


async def heartbeat(api: kubernetes.client.CustomObjectsApi, node: str, driver: ComputeDriver) -> None:
    """Keep the ComputeNode fresh so placement knows this agent is alive."""
    while True:
        await asyncio.sleep(HEARTBEAT_INTERVAL)
        try:
            await asyncio.to_thread(report_host, api, node, driver)
        except Exception as exc:  # keep beating through apiserver or libvirt hiccups
            log.warning("heartbeat of %s failed: %s", node, exc)
