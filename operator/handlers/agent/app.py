"""The node agent: one per node; calls only the driver contract and writes status.

Everything the agent does goes through a handful of kopf event handlers (no change
handlers, timers or daemons, which would add kopf's finalizer and bookkeeping annotations
to users' objects) and one asyncio queue fed by libvirt lifecycle events, retries and the
periodic resync. Blocking driver calls always run in worker threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import kopf
import kubernetes

from kubenova.driver.base import ComputeDriver
from kubenova.driver.images import ImageStore
from kubenova.handlers.agent import diagnostics
from kubenova.handlers.agent.instances import InstanceAgent, Settings
from kubenova.handlers.agent.migration_steps import MigrationAgent
from kubenova.handlers.agent.node_reporter import RENEW_INTERVAL, REPORT_INTERVAL, NodeReporter
from kubenova.handlers.agent.volumes import VolumeAgent
from kubenova.handlers.shared import (
    COMPUTENODES,
    GROUP,
    MIGRATIONS,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    VOLUMEATTACHMENTS,
    node_label,
    talk_to_the_apiserver,
)

log = logging.getLogger(__name__)
AGENT_PREFIX = f"agent.{GROUP}"
#: Threads for kopf's handlers (spawns run there): how many domains the agent starts at once.
EXECUTOR_WORKERS = 8
#: Tasks draining the agent's own queue (lifecycle events, retries, resyncs).
WORKERS = 4
#: While libvirt is unreachable, how often the agent tries to reconnect (and says so on its ComputeNode).
RECONNECT_INTERVAL = 2.0


@dataclasses.dataclass
class AgentConfig:
    node: str
    host_ip: str
    #: How other nodes' libvirtd reach this one's for migrations; published on the ComputeNode.
    migration_uri: str = ""
    metrics_address: str = "127.0.0.1:9464"
    resync_interval: float = 30.0
    diagnostics_interval: float = 60.0
    settings: Settings = dataclasses.field(default_factory=Settings)


def configure(settings: kopf.OperatorSettings, node: str) -> None:
    """Server-side selection and our own names, so nothing here collides with the controller or the user."""
    settings.watching.label_selectors[GROUP, VIRTUALINSTANCES] = f"{NODE_LABEL}={node}"
    settings.watching.label_selectors[GROUP, VOLUMEATTACHMENTS] = f"{NODE_LABEL}={node}"
    settings.watching.label_selectors[GROUP, MIGRATIONS] = node_label(node)  # source or target
    settings.watching.field_selectors[GROUP, COMPUTENODES] = f"metadata.name={node}"
    # kopf strips its configured finalizer from objects whose handlers need none (ours need none:
    # no change handlers), so it must not be AGENT_FINALIZER, which the agent manages itself.
    settings.persistence.finalizer = f"{AGENT_PREFIX}/kopf"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=AGENT_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=AGENT_PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # Events for problems, not for every success
    settings.batching.batch_window = 0.02  # act on the newest state of an object quickly
    settings.execution.max_workers = EXECUTOR_WORKERS
    talk_to_the_apiserver(settings)


async def _every(interval: float, work: Callable[[], None], what: str) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(work)
        except Exception as exc:  # a periodic task outlives a failed round (apiserver or libvirt hiccup)
            log.warning("%s failed: %s", what, exc)


def run(config: AgentConfig, driver: ComputeDriver, images: ImageStore) -> None:
    registry = kopf.OperatorRegistry()
    kubernetes.config.load_config()
    client = kubernetes.client.ApiClient()
    client.user_agent = "kubenova-agent"  # names the field manager in managedFields
    custom = kubernetes.client.CustomObjectsApi(client)
    instances = InstanceAgent(
        config.node, driver, images, custom, kubernetes.client.CoreV1Api(client), config.settings
    )
    volumes = VolumeAgent(instances)
    migrations = MigrationAgent(instances)
    instances.held = migrations.holds
    reporter = NodeReporter(
        config.node,
        driver,
        custom,
        kubernetes.client.CoordinationV1Api(client),
        config.host_ip,
        lambda: set(instances.objects),
        instances.warn,
        config.migration_uri,
    )
    metrics = diagnostics.Metrics()
    tasks: list[asyncio.Task[None]] = []

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, config.node)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        pending: set[tuple[str, str]] = set()

        def enqueue(item: tuple[str, str]) -> None:
            if item not in pending:  # one look per object is enough however many events arrived
                pending.add(item)
                queue.put_nowait(item)

        def schedule(kind: str) -> Callable[[str, float], None]:
            return lambda uid, delay: loop.call_soon_threadsafe(loop.call_later, delay, enqueue, (kind, uid))

        instances.schedule = schedule("instance")
        volumes.schedule = schedule("volume")
        migrations.schedule = schedule("migration")

        def domain_ready(namespace: str, name: str) -> None:
            for uid in volumes.waiting_for(namespace, name):
                loop.call_soon_threadsafe(enqueue, ("volume", uid))

        instances.on_domain_ready = domain_ready
        # libvirt's event thread: only hand the UUID over; the worker reads the state.
        driver.add_lifecycle_listener(lambda uid, *_: loop.call_soon_threadsafe(enqueue, ("observe", uid)))
        driver.add_connection_listener(lambda up: loop.call_soon_threadsafe(enqueue, ("hypervisor", str(up))))

        def hypervisor(up: str) -> None:
            """Say at once on the ComputeNode whether libvirt is reachable; while it is not, keep trying.

            The report reconnects when libvirtd is back; the connection listener then sends "True"
            here, and every instance is looked at again, since its lifecycle events were lost meanwhile.
            """
            try:
                reporter.report()
            except Exception as exc:  # the apiserver may be away too; the condition is written next time
                log.warning("cannot write the hypervisor's state on the ComputeNode: %s", exc)
            if not reporter.connected:
                loop.call_soon_threadsafe(
                    loop.call_later, RECONNECT_INTERVAL, enqueue, ("hypervisor", "False")
                )
            elif up == "True":
                for uid in list(instances.objects):
                    loop.call_soon_threadsafe(enqueue, ("instance", uid))

        work: dict[str, Callable[[str], None]] = {
            "instance": instances.handle,
            "observe": instances.observe,
            "volume": volumes.handle,
            "migration": migrations.handle,
            "hypervisor": hypervisor,
        }

        async def worker() -> None:
            while True:
                item = await queue.get()
                pending.discard(item)
                try:
                    await asyncio.to_thread(work[item[0]], item[1])
                except Exception:
                    log.exception("%s %s failed", *item)

        def relist() -> None:
            """Drop what left this node while a watch was broken (a re-list never says so)."""
            for cache, plural, selector in (
                (instances, VIRTUALINSTANCES, f"{NODE_LABEL}={config.node}"),
                (volumes, VOLUMEATTACHMENTS, f"{NODE_LABEL}={config.node}"),
                (migrations, MIGRATIONS, node_label(config.node)),
            ):
                listed = custom.list_cluster_custom_object(GROUP, VERSION, plural, label_selector=selector)
                cache.prune(listed["items"], listed["metadata"]["resourceVersion"])

        def resync() -> None:
            try:
                relist()
            except Exception as exc:  # the apiserver is away: the instances are still looked at below
                log.warning("re-listing this node's objects failed: %s", exc)
            for uid in list(instances.objects):
                loop.call_soon_threadsafe(enqueue, ("instance", uid))
            for uid in list(migrations.objects):
                loop.call_soon_threadsafe(enqueue, ("migration", uid))
            instances.poll()

        def know_migrations() -> None:
            """This node's migrations, known before the first instance event: an instance whose domain
            left for the target would otherwise look like a guest that vanished, and be started again."""
            listed = custom.list_cluster_custom_object(
                GROUP, VERSION, MIGRATIONS, label_selector=node_label(config.node)
            )
            for item in listed["items"]:
                migrations.seen("ADDED", item)

        await asyncio.to_thread(know_migrations)
        await asyncio.to_thread(driver.init_host, config.node)
        await asyncio.to_thread(reporter.register)
        await asyncio.to_thread(reporter.renew)
        await asyncio.to_thread(reporter.report)  # placement needs the capacity before anything else
        metrics.serve(config.metrics_address)
        jobs: list[Awaitable[None]] = [worker() for _ in range(WORKERS)]
        jobs += [
            _every(RENEW_INTERVAL, reporter.renew, "lease renewal"),
            _every(REPORT_INTERVAL, reporter.report, "host report"),
            _every(config.resync_interval, resync, "resync"),
            _every(
                config.diagnostics_interval, lambda: diagnostics.collect(instances, metrics), "diagnostics"
            ),
        ]
        tasks.extend(asyncio.create_task(job) for job in jobs)  # type: ignore[arg-type]

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        for task in tasks:
            task.cancel()

    @kopf.on.event(GROUP, VERSION, VIRTUALINSTANCES, registry=registry)
    def instance_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        metrics.watch_events.labels(VIRTUALINSTANCES).inc()
        uid = instances.seen(type, body)
        if type != "DELETED":
            instances.handle(uid)

    @kopf.on.event(GROUP, VERSION, VOLUMEATTACHMENTS, registry=registry)
    def volume_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        metrics.watch_events.labels(VOLUMEATTACHMENTS).inc()
        uid = volumes.seen(type, body)
        if type != "DELETED":
            volumes.handle(uid)

    @kopf.on.event(GROUP, VERSION, MIGRATIONS, registry=registry)
    def migration_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        metrics.watch_events.labels(MIGRATIONS).inc()
        uid = migrations.seen(type, body)
        if type != "DELETED":
            migrations.notice(uid)

    @kopf.on.event(GROUP, VERSION, COMPUTENODES, registry=registry)
    def node_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        metrics.watch_events.labels(COMPUTENODES).inc()
        if type != "DELETED":
            reporter.power_action(body)

    kopf.run(registry=registry, clusterwide=True, standalone=True, identity=f"agent-{config.node}")
