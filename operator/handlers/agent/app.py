"""The node agent: one per node; calls only the driver contract and writes status.

kopf delivers the watch events of this node's objects (only event handlers: change handlers, timers
or daemons would add kopf's finalizer and bookkeeping annotations to users' objects); everything
else goes through one work queue (workqueue.py) drained by a fixed pool of threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import kopf
import kubernetes

from kubenova.driver.base import ComputeDriver, Convergence, DriverError
from kubenova.driver.images import ImageStore
from kubenova.handlers import memory
from kubenova.handlers.agent import diagnostics, health, pollers
from kubenova.handlers.agent.access_server import AccessServer
from kubenova.handlers.agent.access_settings import AccessSettings
from kubenova.handlers.agent.cache import ObjectCache
from kubenova.handlers.agent.claims import Claims
from kubenova.handlers.agent.events import EventPoster
from kubenova.handlers.agent.guest_agent import GuestAgentWatch
from kubenova.handlers.agent.imports import importing_first
from kubenova.handlers.agent.instances import InstanceAgent, Settings
from kubenova.handlers.agent.leases import LEASE_POLL, LeaseWatch
from kubenova.handlers.agent.live_migration_steps import DEFAULT_TIMEOUT_PER_GIB
from kubenova.handlers.agent.migration_steps import MigrationAgent
from kubenova.handlers.agent.node_network import NetworkKeeper, NetworkSettings
from kubenova.handlers.agent.node_reporter import LEASE_SECONDS, REPORT_INTERVAL, NodeReporter
from kubenova.handlers.agent.secret_reader import SecretReader
from kubenova.handlers.agent.volumes import VolumeAgent, with_volumes
from kubenova.handlers.agent.workqueue import WorkQueue, every
from kubenova.handlers.core_v1 import CoreV1
from kubenova.handlers.shared import (
    COMPUTENODES,
    GROUP,
    MIGRATIONS,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    VOLUMEATTACHMENTS,
    StatusWriter,
    node_label,
    talk_to_the_apiserver,
    typed,
)

log = logging.getLogger(__name__)
AGENT_PREFIX = f"agent.{GROUP}"
#: Threads for kopf's handlers: they only record a body and add a key, so a few are plenty.
EXECUTOR_WORKERS = 2
#: Threads draining the work queue: how many objects the agent works on at once (spawns included).
WORKERS = 8
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
    #: How often every running guest's agent is asked what status.guestAgent says (and at its events).
    guest_agent_interval: float = 30.0
    #: Nova's image_cache_manager_interval and remove_unused_original_minimum_age_seconds.
    image_cache_interval: float = 2400.0
    image_cache_grace: float = 86400.0
    #: A live transfer's deadline per GiB of guest memory, unless its Migration names one.
    migration_timeout_per_gib: float = DEFAULT_TIMEOUT_PER_GIB
    #: The heartbeat Lease's duration; the controller calls the node unreachable once it expires.
    lease_seconds: int = LEASE_SECONDS
    #: The Kubernetes Node this agent runs on (cluster mode), published on the ComputeNode.
    kubernetes_node: str = ""
    #: The kubelet's root folder, where it mounts claims for holder pods (cluster mode).
    kubelet_dir: pathlib.Path = pathlib.Path("/var/lib/kubelet")
    #: How a live transfer may force its end, unless its Migration says.
    migration_convergence: Convergence = Convergence()
    settings: Settings = dataclasses.field(default_factory=Settings)
    network: NetworkSettings = dataclasses.field(default_factory=NetworkSettings)
    #: The access server (consoles, VNC, port-forwards for the access API server); off without certificates.
    access: AccessSettings = dataclasses.field(default_factory=AccessSettings)


def images_in_use(
    instances: Iterable[Mapping[str, Any]], attachments: Iterable[Mapping[str, Any]]
) -> set[str]:
    """The store images this node's objects name: boot and rescue images, attached images."""
    names = set()
    for body in instances:
        spec = body.get("spec") or {}
        names.add(((spec.get("boot") or {}).get("image") or {}).get("name"))
        names.add((spec.get("rescue") or {}).get("image"))
    for body in attachments:
        names.add(((body.get("spec") or {}).get("image") or {}).get("name"))
    return {name for name in names if name}


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


class Agent:
    """One node's agent: the caches its watches fill, the work queue, the reconcilers and the node reporter.

    kopf's event handlers only record the newest body and add the object's key to the queue; libvirt's
    lifecycle events, retries and the resync add keys too. A fixed pool of worker threads drains the
    queue, so no reconcile runs on kopf's threads and no object is worked on twice at once.
    """

    def __init__(
        self,
        config: AgentConfig,
        driver: ComputeDriver,
        images: ImageStore,
        client: kubernetes.client.ApiClient,
    ) -> None:
        self.config = config
        self.flag_networks = config.settings.networks  # what the agent's flags say, until spec.networks does
        self.driver = driver
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.queue = WorkQueue(WORKERS, config.settings.max_backoff)
        self.instance_cache = ObjectCache(self.queue, "instance")
        self.volume_cache = ObjectCache(self.queue, "volume")
        self.migration_cache = ObjectCache(self.queue, "migration")
        core = CoreV1(client)  # not the client's CoreV1Api: its models would be a fifth of the agent's RSS
        self.events = EventPoster(core, config.node)
        instance_status = StatusWriter(self.custom, VIRTUALINSTANCES)
        claims = Claims(core, config.kubelet_dir)
        self.leases = LeaseWatch(driver, self.instance_cache)
        self.instances = InstanceAgent(
            config.node,
            driver,
            images,
            self.custom,
            instance_status,
            self.events,
            SecretReader(core),
            self.instance_cache,
            self.volume_cache,
            self.migration_cache,
            config.settings,
            claims=claims,
            leases=self.leases.current,
        )
        self.volumes = VolumeAgent(
            config.node,
            driver,
            self.custom,
            StatusWriter(self.custom, VOLUMEATTACHMENTS),
            self.events,
            self.volume_cache,
            self.instance_cache,
            claims,
        )
        self.migrations = MigrationAgent(
            config.node,
            driver,
            self.custom,
            StatusWriter(self.custom, MIGRATIONS),
            instance_status,
            self.events,
            self.migration_cache,
            self.instance_cache,
            with_volumes(
                importing_first(self.instances.driver_spec, driver, self.instances.secrets.image_credentials),
                self.custom,
            ),
            config.migration_timeout_per_gib,
            config.migration_convergence,
        )
        self.network = NetworkKeeper(config.node, driver, self.custom, config.network, self.events.warn)
        self.reporter = NodeReporter(
            config.node,
            driver,
            self.custom,
            kubernetes.client.CoordinationV1Api(client),
            config.host_ip,
            lambda: set(self.instance_cache.objects),
            self.events.warn,
            config.migration_uri,
            config.lease_seconds,
            config.kubernetes_node,
            images,
            self.network,
            config.access.endpoint(config.host_ip) if config.access.enabled else "",
        )
        self.access = (
            AccessServer(config.access, driver, self.instance_cache) if config.access.enabled else None
        )
        self.guest_agent = GuestAgentWatch(self.instances)
        self.metrics = diagnostics.Metrics()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = threading.Event()  # ends a diagnostics round waiting between its writes

    async def start(self) -> None:
        """Know this node's migrations, reach libvirt, register the node, then drain the queue."""
        driver, reporter, config = self.driver, self.reporter, self.config
        # libvirt's event thread only hands the UUID over; a worker reads the state.
        driver.add_lifecycle_listener(lambda uid, *_: self.queue.add(("observe", uid)))
        driver.add_connection_listener(lambda up: self.queue.add(("hypervisor", str(up))))
        driver.add_guest_agent_listener(self.guest_agent.notice)
        await asyncio.to_thread(self._know_migrations)
        await asyncio.to_thread(driver.init_host, config.node)
        await asyncio.to_thread(reporter.register)
        # Known before the first instance event: a fenced node's agent must not start a guest meanwhile.
        config.settings.fenced = bool(reporter.spec.get("fenced"))
        await asyncio.to_thread(reporter.renew)
        await asyncio.to_thread(self._network)  # spawns need it; its figures go with the first report
        await asyncio.to_thread(reporter.report)  # placement needs the capacity before anything else
        health.serve(
            config.metrics_address,
            self.metrics.registry,
            lambda: health.verdict(self.queue.stalled_for(), reporter.connected, config.settings.fenced),
        )
        if self.access is not None:
            await self.access.start()
        self.queue.start(
            {
                "instance": self.instances.handle,
                "observe": self.instances.observe,
                "volume": self.volumes.handle,
                "migration": self.migrations.handle,
                "hypervisor": self._hypervisor,
                "fence": self._fence,
                "network": lambda _: self._network(),
            }
        )
        self.guest_agent.start()
        if config.settings.fenced:  # restarted on a fenced node: whatever runs here stops
            self.queue.add(("fence", "True"))
        jobs = [
            every(config.lease_seconds / 4, reporter.renew, "lease renewal"),
            every(REPORT_INTERVAL, reporter.report, "host report"),
            every(config.resync_interval, self._resync, "resync"),
            every(
                config.diagnostics_interval,
                lambda: diagnostics.collect(
                    self.instances, self.metrics, config.diagnostics_interval / 2, self._stopping
                ),
                "diagnostics",
            ),
            every(config.image_cache_interval, self._manage_image_cache, "image cache"),
            every(config.guest_agent_interval, self.guest_agent.look_at_all, "guest agent look"),
            every(LEASE_POLL, self.leases.poll, "DHCP lease watch"),
        ]
        self._tasks.extend(asyncio.create_task(job) for job in jobs)

    def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        self.queue.stop()
        self.guest_agent.stop()

    def _manage_image_cache(self) -> None:
        """Nova's image cache manager: cached bases no instance here uses go after the grace period."""
        in_use = images_in_use(
            list(self.instance_cache.objects.values()), list(self.volume_cache.objects.values())
        )
        removed = self.driver.manage_image_cache(in_use, self.config.image_cache_grace)
        if removed:
            log.info("removed %d unused cached base images: %s", len(removed), ", ".join(removed))

    def _know_migrations(self) -> None:
        """This node's migrations, known before the first instance event: an instance whose domain
        left for the target would otherwise look like a guest that vanished, and be started again."""
        listed = typed(
            self.custom.list_cluster_custom_object(
                GROUP, VERSION, MIGRATIONS, label_selector=node_label(self.config.node)
            )
        )
        for item in listed["items"]:
            self.migration_cache.seen("ADDED", item)

    def _hypervisor(self, up: str) -> None:
        """Say at once on the ComputeNode whether libvirt is reachable; while it is not, keep trying.

        The report reconnects when libvirtd is back; the connection listener then adds "True" here,
        and every instance is looked at again, since its lifecycle events were lost meanwhile. Attempts
        are queued as "Retry", not as the listener's "False": one due after something else reconnected
        would say libvirt is lost again, and placements would be refused though libvirtd answers.
        """
        try:
            if up == "False" and self.reporter.connected:
                self.reporter.lost()
            else:
                self.reporter.report()
        except Exception as exc:  # the apiserver may be away too; the condition is written next time
            log.warning("cannot write the hypervisor's state on the ComputeNode: %s", exc)
        if not self.reporter.connected:
            self.queue.add_after(("hypervisor", "Retry"), RECONNECT_INTERVAL)
        elif up == "True":
            self.network.forget()  # a restarted libvirtd shadows the network hook's rule: ensured anew
            self._network()
            for uid in list(self.instance_cache.objects):
                self.instance_cache.look(uid)

    def _resync(self) -> None:
        """Drop what left this node while a watch was broken (a re-list never says so), then look at all.
        The lists are the watch cache's copy ("0"): from etcd, every agent's round read all of the cluster's
        instances to filter them. prune keeps what the watch brought since the copy."""
        node = self.config.node
        try:
            for cache, plural, selector in (
                (self.instance_cache, VIRTUALINSTANCES, f"{NODE_LABEL}={node}"),
                (self.volume_cache, VOLUMEATTACHMENTS, f"{NODE_LABEL}={node}"),
                (self.migration_cache, MIGRATIONS, node_label(node)),
            ):
                found = self.custom.list_cluster_custom_object(
                    GROUP, VERSION, plural, label_selector=selector, resource_version="0"
                )
                listed = typed(found)
                cache.prune(listed["items"], listed["metadata"]["resourceVersion"])
        except Exception as exc:  # the apiserver is away: the instances are still looked at below
            log.warning("re-listing this node's objects failed: %s", exc)
        for uid in list(self.instance_cache.objects):
            self.instance_cache.look(uid)
        for uid in list(self.migration_cache.objects):
            self.migration_cache.look(uid)
        pollers.poll(self.instances)
        self._network()  # another node may have taken an overlapping subnet meanwhile
        memory.trim()  # what the round's lists and any burst since the last left behind

    # --- kopf's event handlers: record the newest body, then ask for work --------------------------

    def instance_event(self, type: str | None, body: kopf.Body, **_: Any) -> None:
        self.metrics.watch_events.labels(VIRTUALINSTANCES).inc()
        uid = self.instance_cache.seen(type, body)
        if type != "DELETED":
            self.instance_cache.look(uid)
        if body["metadata"].get("deletionTimestamp"):
            self.migrations.instance_deleted(uid)

    def volume_event(self, type: str | None, body: kopf.Body, **_: Any) -> None:
        self.metrics.watch_events.labels(VOLUMEATTACHMENTS).inc()
        uid = self.volume_cache.seen(type, body)
        if type != "DELETED":
            self.volume_cache.look(uid)

    def migration_event(self, type: str | None, body: kopf.Body, **_: Any) -> None:
        """A cancel is acted on at once (a transfer holds its worker for minutes); steps go to the queue."""
        self.metrics.watch_events.labels(MIGRATIONS).inc()
        uid = self.migration_cache.seen(type, body)
        if type != "DELETED":
            self.migrations.notice(uid)

    def node_event(self, type: str | None, body: kopf.Body, **_: Any) -> None:
        self.metrics.watch_events.labels(COMPUTENODES).inc()
        if type != "DELETED":
            self.reporter.power_action(body)
            self._apply_networks((body.get("spec") or {}).get("networks"))
            spec = body.get("spec") or {}
            if (spec.get("network"), spec.get("firewall")) != (
                self.reporter.spec.get("network"),
                self.reporter.spec.get("firewall"),
            ):
                self.reporter.spec = dict(spec)
                self.queue.add(("network", "spec"))
            fenced = bool((body.get("spec") or {}).get("fenced"))
            if fenced != self.config.settings.fenced:
                self.config.settings.fenced = fenced
                self.queue.add(("fence", str(fenced)))
            if self.reporter.seen(body):  # someone else (the controller) said otherwise meanwhile
                self.queue.add(("hypervisor", "True"))

    def _fence(self, fenced: str) -> None:
        """Fenced: stop every guest here at once and start none (the controller may be starting them
        elsewhere: the admin's signal says this host is down, and if it is not, it must act so).
        Unfenced: every instance is looked at again."""
        if fenced == "True":
            log.warning("ComputeNode %s is fenced: stopping every guest on this host", self.config.node)
            try:
                for uid in self.driver.list_instances():
                    self.driver.power_off(uid)
            except DriverError as exc:  # libvirt away: tried again until every guest here is stopped
                log.warning("cannot stop the guests of the fenced node yet: %s", exc)
                self.queue.add_after(("fence", fenced), RECONNECT_INTERVAL)
        for uid in list(self.instance_cache.objects):
            self.instance_cache.look(uid)

    def _network(self) -> None:
        """The node network and provider rules as the ComputeNode's spec (or the flags) say."""
        self.network.ensure(self.reporter.spec, self.reporter.status)

    def _apply_networks(self, spec: Mapping[str, Any] | None) -> None:
        """The ComputeNode's network allow-list, live: instances are looked at again when it changes, so
        one waiting for a network starts once it is opened (running ones keep their networks)."""
        networks = self.flag_networks.configured(spec)
        if networks != self.config.settings.networks:
            self.config.settings.networks = networks
            uids = list(self.instance_cache.objects)
            self.instances.reconsider.update(uids)
            for uid in uids:
                self.instance_cache.look(uid)


def run(config: AgentConfig, driver: ComputeDriver, images: ImageStore) -> None:
    registry = kopf.OperatorRegistry()
    kubernetes.config.load_config()
    client = kubernetes.client.ApiClient()
    client.user_agent = "kubenova-agent"  # names the field manager in managedFields
    agent = Agent(config, driver, images, client)

    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, config.node)
        await agent.start()

    async def cleanup(**_: Any) -> None:
        agent.stop()
        if agent.access is not None:
            await agent.access.stop()

    kopf.on.login(registry=registry)(kopf.login_via_client)
    kopf.on.startup(registry=registry)(startup)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.on.event(GROUP, VERSION, VIRTUALINSTANCES, registry=registry)(agent.instance_event)
    kopf.on.event(GROUP, VERSION, VOLUMEATTACHMENTS, registry=registry)(agent.volume_event)
    kopf.on.event(GROUP, VERSION, MIGRATIONS, registry=registry)(agent.migration_event)
    kopf.on.event(GROUP, VERSION, COMPUTENODES, registry=registry)(agent.node_event)
    # An explicit identity: kopf's default asks the passwd database for the user's name, and the
    # image's non-root UID has no entry there.
    # kopf's Identity is a NewType of str, which mypy does not take a plain str for.
    kopf.run(registry=registry, clusterwide=True, standalone=True, identity=f"agent-{config.node}")  # type: ignore[arg-type]
