"""The agent's VirtualInstances: make each domain match its spec and report what libvirt sees.

The agent is level-triggered and writes as little as it can. It does not use kopf's change
handlers (they cost a finalizer write, a progress annotation and a diff-base annotation per
change); every watch event, lifecycle event and resync runs the same idempotent `handle`,
which compares the domain with the spec and writes `status` only when something differs.
The controller adds the agent's finalizer when it binds the object, so a create costs the
agent one write: the status that says Running.

The pure steps live beside it: spec translation (translate.py), the power state machine (power.py), when a
guest paused on a full disk runs again (io_errors.py), the one-shot actions (actions.py); this module reads,
orchestrates and writes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes
import urllib3

from kubenova import faults
from kubenova.driver.base import (
    ComputeDriver,
    DriverError,
    ImageRef,
    InstanceNotFound,
    InstanceSpec,
    InvalidInstanceSpec,
    PowerState,
)
from kubenova.driver.images import ImageStore
from kubenova.handlers.agent import io_errors, power
from kubenova.handlers.agent.actions import ActionRunner
from kubenova.handlers.agent.cache import ObjectCache
from kubenova.handlers.agent.claims import Claims
from kubenova.handlers.agent.domain_status import observed_status, unsaid_stop
from kubenova.handlers.agent.events import EventPoster
from kubenova.handlers.agent.firewall import FirewallKeeper
from kubenova.handlers.agent.imports import ImportRunning, Imports
from kubenova.handlers.agent.migration_turns import bound_elsewhere, holds
from kubenova.handlers.agent.secret_reader import SecretReader, WaitFor
from kubenova.handlers.agent.translate import (
    PREVIOUS_FORMAT,
    NetworkAllowList,
    definition_digest,
    driver_spec,
)
from kubenova.handlers.agent.volumes import waiting_for
from kubenova.handlers.shared import (
    AGENT_FINALIZER,
    GROUP,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    WritesStatus,
    condition,
    flavor_of,
    read_fresh,
    remove_finalizer,
    set_condition,
    typed,
)

log = logging.getLogger(__name__)


class NotHere(Exception):
    """The object moved to another node or went away; this agent's copy was stale."""


class BeingDeleted(Exception):
    """The newest version of the object, still bound here, is being deleted: no domain is made for it."""


@dataclasses.dataclass
class Settings:
    """The agent's tunables; defaults follow Nova's where Nova has one."""

    soft_reboot_timeout: float = 60.0
    #: A domain stopped outside Kubernetes starts again after this long: the stop shows, a crash cannot spin.
    restart_delay: float = 10.0
    rescue_timeout: float = 0.0  # 0: never warn
    reboot_timeout: float = 180.0
    max_backoff: float = 300.0
    #: A guest paused on a disk I/O error (a full disk) runs again after this long, then after twice as
    #: long each time it stops again, at most io_error_max_delay (io_errors.py).
    io_error_delay: float = 30.0
    io_error_max_delay: float = 600.0
    networks: NetworkAllowList = dataclasses.field(default_factory=NetworkAllowList)
    #: The node's ComputeNode says spec.fenced: no guest starts here.
    fenced: bool = False


class InstanceAgent:
    """Everything the agent knows and does about the VirtualInstances bound to its node.

    Its methods run on the agent's work queue ("instance" and "observe" keys), which never runs two
    pieces of work on one object at once. It reads the node's VolumeAttachments and Migrations from
    their caches: attachments waiting for a domain are asked for once it exists, and a migration
    under way keeps its hands off the domain.
    """

    def __init__(
        self,
        node: str,
        driver: ComputeDriver,
        images: ImageStore,
        objects: kubernetes.client.CustomObjectsApi,
        status: WritesStatus,
        events: EventPoster,
        secrets: SecretReader,
        cache: ObjectCache,
        volumes: ObjectCache,
        migrations: ObjectCache,
        settings: Settings | None = None,
        clock: Callable[[], float] = time.monotonic,
        claims: Claims | None = None,
        leases: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        """``objects`` reads and patches VirtualInstances (their metadata), ``status`` writes their status,
        ``secrets`` reads the Secrets they name, ``claims`` finds root disks' claims; the caches are the
        node's instances, attachments and migrations as the watches last saw them. ``clock`` is monotonic;
        ``leases`` the lease watch's last read (a status write never waits on libvirt's network)."""
        self.node = node
        self.driver = driver
        self.images = images
        self.objects = objects
        self.status = status
        self.events = events
        self.secrets = secrets
        self.cache = cache
        self.volumes = volumes
        self.migrations = migrations
        self.settings = settings or Settings()
        self.clock = clock
        self.leases = leases or driver.dhcp_leases
        self.claims = claims
        self.reconsider: set[str] = set()  # Failed instances to look at once more despite no spec change
        self._stopped_outside: dict[str, float] = {}
        self.io_errors = io_errors.IOErrorRetries(
            self.settings.io_error_delay, self.settings.io_error_max_delay, cache.schedule, clock
        )
        self.actions = ActionRunner(
            driver, images, secrets, events, self.write, self.settings.soft_reboot_timeout
        )
        self.imports = Imports(driver, cache.look, clock)
        self.firewall = FirewallKeeper(driver)  # spec.firewall, live
        cache.on_forget(self.firewall.forget)
        cache.on_forget(self._forget)
        cache.on_forget(events.forget)

    # --- bookkeeping ---------------------------------------------------------------------

    def _forget(self, uid: str) -> None:
        self.imports.forget(uid)
        self.actions.forget(uid)
        self._stopped_outside.pop(uid, None)
        self.io_errors.forget(uid)

    def held(self, uid: str) -> str | None:
        """Why a migration keeps the agent's hands off the instance ("active", "moved"), or None."""
        return holds(self.migrations.objects.values(), uid, self.node)

    def _domain_ready(self, namespace: str, name: str) -> None:
        """Attachments that waited for this instance's domain get their look."""
        for uid in waiting_for(self.volumes.objects.values(), namespace, name):
            self.volumes.look(uid)

    def write(self, body: dict[str, Any], patch: dict[str, Any], guard: bool = False) -> None:
        """Patch status only when it changes something; keep the answer as the newest body.

        Every answer of this agent also says the instance is placed here: the controller binds with a
        metadata write and leaves the Scheduled condition to the agent, whatever the spec's outcome
        (an instance that waited Unschedulable and fails here is still placed).
        """
        status = body.get("status") or {}
        placed = f"placed on {self.node}"
        scheduled = condition(patch, "Scheduled") or condition(status, "Scheduled") or {}
        if (scheduled.get("status"), scheduled.get("message")) != ("True", placed):
            set_condition(patch, status, "Scheduled", True, "Placed", placed)
        fresh = self.status.write(body, patch, guard)
        if fresh is None or fresh is body:  # gone, or nothing to say
            return
        self.cache.written(fresh)
        phase = patch.get("phase")
        if (
            phase and phase != status.get("phase") and phase not in ("Failed", "Pending")
        ):  # failures warn already
            ready = condition(patch, "Ready") or {}
            self.events.post(body, phase, f"{ready.get('message', phase)} (on {self.node})", "Normal")
        body.clear()
        body.update(fresh)

    # --- the reconcile loop ---------------------------------------------------------------

    def handle(self, uid: str) -> None:
        """Converge one object; on failure say why in status and try again later (the queue's backoff)."""
        body = self.cache.objects.get(uid)
        if body is None:
            return
        try:
            held = self.held(uid)
            if held:  # the migration's steps move the domain; a delete waits for them to end
                if held == "active" and not body["metadata"].get("deletionTimestamp"):
                    self.write(body, {"phase": "Migrating"})
                return
            if body["metadata"].get("deletionTimestamp"):
                self._delete(body)
                return
            self._reconcile(body)
        except BeingDeleted:
            self._delete(body)
        except ImportRunning:  # the import's progress and end look again; no backoff
            self.cache.succeeded(uid)
        except NotHere:
            log.info(
                "%s/%s is not bound to %s any more; forgetting it",
                body["metadata"]["namespace"],
                body["metadata"]["name"],
                self.node,
            )
            if self.cache.current(body):  # a newer version seen meanwhile decides anew
                self.cache.forget(body)
        except WaitFor as exc:
            self._retry_later(uid, body, exc.reason, str(exc))
        except DriverError as exc:
            self._retry_later(uid, body, "HypervisorError", str(exc))
        except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError) as exc:
            log.warning("API error on %s: %s; trying again later", uid, getattr(exc, "reason", exc))
            self.cache.retry_later(uid)
        except Exception:  # a bug must not stop the retries (or leave an action InProgress)
            log.exception("reconciling %s failed", uid)
            self.cache.retry_later(uid)
        else:
            self.cache.succeeded(uid)

    def _retry_later(self, uid: str, body: dict[str, Any], reason: str, message: str) -> None:
        status = body.get("status") or {}
        patch: dict[str, Any] = {}
        set_condition(patch, status, "Ready", False, reason, message, body["metadata"].get("generation"))
        # Guarded: a wait seen on a body the controller has changed since (a claim it refused) says nothing.
        self.write(body, patch, guard=True)
        self.events.warn(body, reason, message)
        self.cache.retry_later(uid)

    def _reconcile(self, body: dict[str, Any]) -> None:
        meta, spec = body["metadata"], body.get("spec") or {}
        status, generation = body.get("status") or {}, meta.get("generation")
        if AGENT_FINALIZER not in (meta.get("finalizers") or []):
            self._add_finalizer(body)  # the controller normally adds it when binding
        # Once after the network allow-list changed, or after the controller said Unknown meanwhile.
        again = (
            meta["uid"] in self.reconsider or (condition(status, "Ready") or {}).get("status") == "Unknown"
        )
        self.reconsider.discard(meta["uid"])
        if status.get("phase") == "Failed" and status.get("observedGeneration") == generation and not again:
            return  # said already; waits for a spec change (or a new network allow-list)
        try:
            self._converge(body)
        except InvalidInstanceSpec as exc:
            reason = exc.reason
            patch: dict[str, Any] = {"phase": "Failed", "node": self.node, "observedGeneration": generation}
            set_condition(patch, status, "Ready", False, reason, str(exc), generation)
            self.write(body, patch)
            self.events.warn(body, reason, str(exc))
            return
        self.write(body, self._observed(body))
        if spec.get("actions") and self.actions.run(body):
            self.write(body, self._observed(body))  # a reboot may have applied a pending change
        self._domain_ready(meta["namespace"], meta["name"])
        self._restart_later_if_needed(body)

    def _converge(self, body: dict[str, Any]) -> None:
        meta, spec = body["metadata"], body.get("spec") or {}
        uid, want = meta["uid"], power.wanted(spec)
        if self.settings.fenced:  # every guest here stops, even one a spawn started during the fence
            if self.driver.instance_exists(uid):
                self.driver.power_off(uid)
            raise WaitFor("NodeFenced", f"{self.node} is fenced (ComputeNode spec.fenced): nothing runs here")
        driver = self.driver
        waiting: WaitFor | None = None
        if not driver.instance_exists(uid):
            image = self.imports.ensure(body, self.write, self.secrets.image_credentials, self.node)
            if not self._still_here(body):
                raise NotHere()
            refusal = bound_elsewhere(body, self.migrations.objects.values(), self.node)
            if refusal:  # never a second copy of a guest that may run where status says
                raise WaitFor("BoundElsewhere", refusal)
            driver.spawn(self.driver_spec(body, flavor_of(body)), power_on=want != "Stopped")
            self.firewall.spawned(uid, spec)
            if image is not None:
                self.write(body, {"image": image})
        elif (defined := driver.defined_revision(uid)) != definition_digest(spec, flavor_of(body)):
            # The spec changed in what makes the domain: the definition follows it, for the next boot
            # where the running domain cannot take it (_observed says so as RestartRequired).
            try:
                driver.redefine(self.driver_spec(body, flavor_of(body)))
            except WaitFor as exc:  # a Secret it needs is gone: the power state is still followed below
                # only a newer definition format asked for it, not the user: nothing to say
                if defined != definition_digest(spec, flavor_of(body), PREVIOUS_FORMAT):
                    waiting = exc
        self.firewall.follow(uid, spec)
        self._follow(body, want)
        if waiting is not None:
            raise waiting

    def _follow(self, body: dict[str, Any], want: str) -> None:
        """Rescue and power state as the spec says."""
        meta, spec = body["metadata"], body.get("spec") or {}
        uid, driver = meta["uid"], self.driver
        rescue = spec.get("rescue") or {}
        if rescue.get("enabled"):
            driver.rescue(uid, ImageRef(rescue["image"], namespace=meta["namespace"]))
        else:
            driver.unrescue(uid)
        info = driver.get_info(uid)
        decision = power.follow(
            want,
            info.state,
            body.get("status") or {},
            meta.get("generation"),
            self._stopped_outside.get(uid),
            self.clock(),
            self.settings.restart_delay,
            spec.get("runStrategy", "Always"),
        )
        if decision.stopped_since is not None:
            self._stopped_outside[uid] = decision.stopped_since
        else:
            self._stopped_outside.pop(uid, None)
        if self.io_errors.hold(uid, info.io_error and want == "Running"):  # a resume would stop again
            self.events.warn(body, io_errors.REASON, io_errors.message(self.node))
        elif decision.plan is not None:  # else _restart_later_if_needed brings it back after the delay
            self._power(uid, want, decision.plan)

    def _still_here(self, body: dict[str, Any]) -> bool:
        """Whether the newest version of the object is still bound to this node (BeingDeleted when it is,
        but is being deleted).

        Asked before a domain is created, the one act a stale copy must never cause: after a migration
        whose label change this agent missed, it would start a second copy of a guest running elsewhere.
        """
        fresh = read_fresh(self.objects, VIRTUALINSTANCES, body["metadata"])
        if fresh is None or (fresh["metadata"].get("labels") or {}).get(NODE_LABEL) != self.node:
            return False
        body.clear()
        body.update(fresh)
        if fresh["metadata"].get("deletionTimestamp"):  # still ours to let go: our finalizer holds it
            raise BeingDeleted()
        return True

    def _power(self, uid: str, want: str, plan: power.PowerPlan) -> None:
        """Carry out the plan; where its outcome is uncertain, read the state and plan anew (bounded)."""
        for looks in range(3):  # resume, then power on, then pause: the longest way there
            for step in plan.steps:
                getattr(self.driver, step.value)(uid)
                if step is power.PowerStep.POWER_OFF:
                    faults.point("power.stopped")
            if not plan.look_again or looks == 2:
                return
            plan = power.power_plan(want, self.driver.get_info(uid).state)

    def _observed(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The status fields from what libvirt reports now; a stop made meanwhile is outside (unsaid_stop)."""
        uid = body["metadata"]["uid"]

        def outside(state: PowerState) -> bool:  # the state observed_status read: a stop it is first to see
            if unsaid_stop(body, state):
                self._stopped_outside.setdefault(uid, self.clock())
            return uid in self._stopped_outside

        return observed_status(
            self.driver, self.node, body, outside, self.settings.restart_delay, self.leases
        )

    def _restart_later_if_needed(self, body: Mapping[str, Any]) -> None:
        uid = body["metadata"]["uid"]
        if uid in self._stopped_outside:
            left = self.settings.restart_delay - (self.clock() - self._stopped_outside[uid])
            self.cache.schedule(uid, max(0.0, left) + 0.1)

    # --- out-of-band changes ----------------------------------------------------------------

    def observe(self, uid: str) -> None:
        """A lifecycle event or a resync: put what libvirt reports into status if it changed."""
        body = self.cache.objects.get(uid)
        if body is None or body["metadata"].get("deletionTimestamp") or self.held(uid):
            return
        status = body.get("status") or {}
        if status.get("phase") in ("Failed", None) or "powerState" not in status:
            return  # not created yet, or failed: handle() owns it
        try:
            state = self.driver.get_info(uid).state
        except InstanceNotFound:
            state = PowerState.NOSTATE
        except DriverError as exc:
            log.warning("cannot read the state of %s: %s", uid, exc)
            return
        if state.value == status.get("powerState"):
            return
        if power.stopped_against_spec(power.wanted(body.get("spec") or {}), state):
            self._stopped_outside.setdefault(uid, self.clock())
        self.write(body, self._observed(body))
        self._restart_later_if_needed(body)

    def driver_spec(self, instance: Mapping[str, Any], flavor: Mapping[str, Any]) -> InstanceSpec:
        """The driver's view of an instance with this flavor, its secrets read from their Secrets first, and
        its root disk's claim found on this node (WaitFor until the kubelet has mounted it here)."""
        made = driver_spec(
            instance, flavor, self.images, self.secrets.for_instance(instance), self.settings.networks
        )
        root = self.claims.root(instance) if self.claims else None
        return dataclasses.replace(made, root_claim=root) if root else made

    # --- deletion -------------------------------------------------------------------------

    def _add_finalizer(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        finalizers = [*(meta.get("finalizers") or []), AGENT_FINALIZER]
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
        fresh = typed(
            self.objects.patch_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], VIRTUALINSTANCES, meta["name"], patch
            )
        )
        body.clear()
        body.update(fresh)

    def _delete(self, body: dict[str, Any]) -> None:
        """Destroy the domain and its own files (a missing domain is fine), then let the object go."""
        meta = body["metadata"]
        if AGENT_FINALIZER not in (meta.get("finalizers") or []):
            return
        try:
            self.driver.destroy(meta["uid"])
        except DriverError as exc:
            self.events.warn(body, "DeleteFailed", str(exc))
            self.cache.retry_later(meta["uid"])
            return
        faults.point("delete.destroyed")
        self.events.post(
            body, "Deleted", f"the domain and the instance's own disks are gone from {self.node}", "Normal"
        )
        remove_finalizer(self.objects, body, VIRTUALINSTANCES)
