"""The node agent: one per node; calls only the driver contract and writes status."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
import kubernetes

from kubenova.driver.images import ImageStore
from kubenova.driver.libvirt.driver import LibvirtDriver
from kubenova.handlers import computenode, virtualinstance
from kubenova.handlers.common import GROUP, NODE_LABEL, VIRTUALINSTANCES
from kubenova.handlers.virtualinstance import AgentMemo

AGENT_PREFIX = f"agent.{GROUP}"


def configure(settings: kopf.OperatorSettings, node: str) -> None:
    """Own storage keys and finalizer, so the agent never collides with the controller's writes."""
    settings.watching.label_selectors[GROUP, VIRTUALINSTANCES] = f"{NODE_LABEL}={node}"
    settings.persistence.finalizer = f"{GROUP}/agent"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=AGENT_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=AGENT_PREFIX, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # Events for problems, not for every success
    settings.execution.max_workers = 8


def run(node: str, uri: str, domain_type: str, image_store: str, instances_dir: str, volume_store: str) -> None:
    registry = kopf.OperatorRegistry()
    images = ImageStore(image_store)
    driver = LibvirtDriver(uri, domain_type, instances_dir, images, volume_store)
    memo = AgentMemo(node=node, driver=driver, images=images)
    tasks: list[asyncio.Task[None]] = []

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, node)
        await asyncio.to_thread(driver.init_host, node)
        api = kubernetes.client.CustomObjectsApi()
        await asyncio.to_thread(computenode.report_host, api, node, driver)
        tasks.append(asyncio.create_task(computenode.heartbeat(api, node, driver)))

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        for task in tasks:
            task.cancel()

    virtualinstance.register_agent(registry)
    kubernetes.config.load_config()
    kopf.run(registry=registry, clusterwide=True, standalone=True, memo=memo)

