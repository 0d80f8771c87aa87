"""The agent's VirtualInstances: make each domain match its spec and report what libvirt sees.

The agent is level-triggered and writes as little as it can. It does not use kopf's change
handlers (they cost a finalizer write, a progress annotation and a diff-base annotation per
change); every watch event, lifecycle event and resync runs the same idempotent `handle`,
which compares the domain with the spec and writes `status` only when something differs.
The controller adds the agent's finalizer when it binds the object, so a create costs the
agent one write: the status that says Running.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import secrets
import string
import time
from collections.abc import Mapping
from typing import Any

import kubernetes
import urllib3

from kubenova import api, faults
from kubenova.driver.base import (
    ComputeDriver,
    DriverError,
    ImageRef,
    InjectedFile,
    InstanceNotFound,
    InstanceNotRunning,
    InstanceSpec,
    Interface,
    InvalidInstanceSpec,
    KernelBoot,
    PowerState,
    RebootType,
)
from kubenova.driver.images import ImageStore
from kubenova.handlers.agent.cache import ObjectCache, older
from kubenova.handlers.agent.events import EventPoster
from kubenova.handlers.agent.migration_steps import holds
from kubenova.handlers.agent.volumes import waiting_for
from kubenova.handlers.shared import (
    AGENT_FINALIZER,
    GROUP,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    StatusWriter,
    condition,
    drop_condition,
    flavor_of,
    now,
    remove_finalizer,
    set_condition,
    typed,
)

log = logging.getLogger(__name__)

#: Spec fields the API accepts but this agent does not act on yet; using one fails clearly.
NOT_YET_IMPLEMENTED = ("boot.image.url",)
ACTIONS = ("reboot", "snapshot", "passwordReset")


class SpecProblem(Exception):
    """Retrying cannot help until the spec changes; ``reason`` is the condition's reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotHere(Exception):
    """The object moved to another node or went away; this agent's copy was stale."""


class BeingDeleted(Exception):
    """The newest version of the object, still bound here, is being deleted: no domain is made for it."""


class WaitFor(Exception):
    """Something outside the spec is missing (a Secret); retried with backoff, said in status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class Settings:
    """The agent's tunables; defaults follow Nova's where Nova has one."""

    soft_reboot_timeout: float = 60.0
    #: After a domain stops outside Kubernetes while its spec says Running, wait this long
    #: before starting it again, so the stop is visible and a crashing guest cannot spin.
    restart_delay: float = 10.0
    rescue_timeout: float = 0.0  # 0: never warn
    reboot_timeout: float = 180.0
    max_backoff: float = 300.0


def unsupported(spec: Mapping[str, Any]) -> list[str]:
    """The spec fields set here that this agent cannot honour yet, as user-facing paths."""
    found = []
    for path in NOT_YET_IMPLEMENTED:
        node: Any = spec
        for key in path.split("."):
            node = node.get(key) if isinstance(node, Mapping) else None
        if node not in (None, [], {}, ""):
            found.append(f"spec.{path}")
    return found


def instance_spec(
    uid: str,
    namespace: str,
    name: str,
    spec: api.VirtualInstanceSpec,
    images: ImageStore,
    admin_password: str | None,
    vnc_password: str | None = None,
) -> InstanceSpec:
    """Translate the spec for the driver; names the offending field when the node cannot run it."""
    boot = spec["boot"]
    kernel = boot.get("kernel")
    image = boot.get("image")
    flavor = spec["flavor"]
    files = []
    for index, item in enumerate(spec.get("injectedFiles") or []):
        try:
            files.append(InjectedFile(item["path"], base64.b64decode(item["content"], validate=True)))
        except ValueError as exc:
            raise InvalidInstanceSpec(f"spec.injectedFiles[{index}].content", f"not base64: {exc}") from exc
    return InstanceSpec(
        uuid=uid,
        name=name,
        namespace=namespace,
        vcpus=int(flavor["vcpus"]),
        memory_mib=int(flavor["memoryMiB"]),
        boot=KernelBoot(
            kernel=images.resolve("spec.boot.kernel.image", kernel["image"]),
            initrd=images.resolve("spec.boot.kernel.initrd", kernel["initrd"])
            if kernel.get("initrd")
            else None,
            cmdline=kernel.get("cmdline", "console=ttyS0"),
        )
        if kernel
        else None,
        image=ImageRef(image["name"], image.get("checksum")) if image else None,
        root_gib=(spec.get("rootDisk") or {}).get("sizeGiB"),
        ephemeral_gib=tuple((d["name"], int(d["sizeGiB"])) for d in spec.get("ephemeralDisks") or []),
        swap_mib=(spec.get("swap") or {}).get("sizeMiB"),
        interfaces=tuple(
            Interface(i["name"], i["network"], i.get("macAddress"), i.get("model", "virtio"))
            for i in spec.get("interfaces") or []
        ),
        user_data=spec.get("userData"),
        network_config=spec.get("networkConfig"),
        injected_files=tuple(files),
        admin_password=admin_password,
        vnc_password=vnc_password,
    )


def vnc_secret_name(instance: str) -> str:
    """``<name>-vnc``; a name too long for the suffix is cut and keeps a digest of the whole, so two
    long names that share their start never share a password."""
    if len(instance) <= 249:
        return f"{instance}-vnc"
    return f"{instance[:236]}-{hashlib.sha256(instance.encode()).hexdigest()[:12]}-vnc"


#: Spec fields that do not shape the domain's definition: a change of only these needs no redefine (and
#: no Secret read: a VM whose password Secret was deleted after its first boot can still be stopped).
RUNTIME_FIELDS = ("powerState", "rescue", "actions", "nodeSelector", "nodeName")


def definition_digest(spec: Mapping[str, Any], flavor: Mapping[str, Any]) -> str:
    """A digest of what a domain's definition is made from: the spec but its runtime fields, with this flavor.

    The driver keeps it with the definition (InstanceSpec.revision), so the agent redefines a domain only
    when this changed, even after a restart, and never for a change of power state.
    """
    shaping = {k: v for k, v in spec.items() if k not in RUNTIME_FIELDS}
    shaping["flavor"] = {"vcpus": int(flavor["vcpus"]), "memoryMiB": int(flavor["memoryMiB"])}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:32]


PHASES = {
    PowerState.RUNNING: "Running",
    PowerState.BLOCKED: "Running",
    PowerState.SHUTDOWN: "Running",
    PowerState.PAUSED: "Paused",
    PowerState.SUSPENDED: "Suspended",
    PowerState.SHUTOFF: "Stopped",
    PowerState.CRASHED: "Stopped",
    PowerState.NOSTATE: "Stopped",
}


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
        custom: kubernetes.client.CustomObjectsApi,
        events: EventPoster,
        cache: ObjectCache,
        volumes: ObjectCache,
        migrations: ObjectCache,
        settings: Settings | None = None,
    ) -> None:
        self.node = node
        self.driver = driver
        self.images = images
        self.custom = custom
        self.core = events.core
        self.events = events
        self.cache = cache
        self.volumes = volumes
        self.migrations = migrations
        self.status = StatusWriter(custom, VIRTUALINSTANCES)
        self.settings = settings or Settings()
        self._stopped_outside: dict[str, float] = {}
        #: (uid, action) -> (id, result) of the actions this process carried out.
        self._acted: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        cache.on_forget(self._forget)
        cache.on_forget(events.forget)

    # --- bookkeeping ---------------------------------------------------------------------

    def _forget(self, uid: str) -> None:
        self._acted = {key: value for key, value in self._acted.items() if key[0] != uid}
        self._stopped_outside.pop(uid, None)

    def held(self, uid: str) -> str | None:
        """Why a migration keeps the agent's hands off the instance ("active", "moved"), or None."""
        return holds(self.migrations.objects.values(), uid, self.node)

    def _domain_ready(self, namespace: str, name: str) -> None:
        """Attachments that waited for this instance's domain get their look."""
        for uid in waiting_for(self.volumes.objects.values(), namespace, name):
            self.volumes.look(uid)

    def write(self, body: dict[str, Any], patch: dict[str, Any]) -> None:
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
        fresh = self.status.write(body, patch)
        if fresh is None or fresh is body:  # gone, or nothing to say
            return
        if body["metadata"]["uid"] in self.cache.objects:
            self.cache.seen("MODIFIED", fresh)  # unless a newer version arrived meanwhile
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
        except NotHere:
            log.info(
                "%s/%s is not bound to %s any more; forgetting it",
                body["metadata"]["namespace"],
                body["metadata"]["name"],
                self.node,
            )
            if not older(body, self.cache.objects.get(uid)):  # a newer version seen meanwhile decides anew
                self.cache.seen("DELETED", body)
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
        self.write(body, patch)
        self.events.warn(body, reason, message)
        self.cache.retry_later(uid)

    def _reconcile(self, body: dict[str, Any]) -> None:
        meta, spec = body["metadata"], body.get("spec") or {}
        status = body.get("status") or {}
        generation = meta.get("generation")
        if AGENT_FINALIZER not in (meta.get("finalizers") or []):
            self._add_finalizer(body)  # the controller normally adds it when binding
        if status.get("phase") == "Failed" and status.get("observedGeneration") == generation:
            return  # said already; waits for a spec change
        try:
            self._converge(body)
        except (SpecProblem, InvalidInstanceSpec) as exc:
            reason = exc.reason if isinstance(exc, SpecProblem) else "InvalidSpec"
            patch: dict[str, Any] = {"phase": "Failed", "node": self.node, "observedGeneration": generation}
            set_condition(patch, status, "Ready", False, reason, str(exc), generation)
            self.write(body, patch)
            self.events.warn(body, reason, str(exc))
            return
        self.write(body, self._observed(body))
        if spec.get("actions") and self._actions(body):
            self.write(body, self._observed(body))  # a reboot may have applied a pending change
        self._domain_ready(meta["namespace"], meta["name"])
        self._restart_later_if_needed(body)

    def _converge(self, body: dict[str, Any]) -> None:
        meta, spec = body["metadata"], body.get("spec") or {}
        uid, want = meta["uid"], spec.get("powerState", "Running")
        missing = unsupported(spec)
        if missing:
            raise SpecProblem(
                "Unsupported",
                f"{', '.join(missing)}: not implemented by this kubenova agent yet; "
                "remove it from the spec to run the instance",
            )
        driver = self.driver
        waiting: WaitFor | None = None
        if not driver.instance_exists(uid):
            if not self._still_here(body):
                raise NotHere()
            driver.spawn(self.driver_spec(body, flavor_of(body)), power_on=want != "Stopped")
        elif driver.defined_revision(uid) != definition_digest(spec, flavor_of(body)):
            # The spec changed in what makes the domain: the definition follows it, for the next boot
            # where the running domain cannot take it (_observed says so as RestartRequired).
            try:
                driver.redefine(self.driver_spec(body, flavor_of(body)))
            except WaitFor as exc:  # a Secret it needs is gone: the power state is still followed below
                waiting = exc
        self._follow(body, want)
        if waiting is not None:
            raise waiting

    def _follow(self, body: dict[str, Any], want: str) -> None:
        """Rescue and power state as the spec says."""
        meta, spec = body["metadata"], body.get("spec") or {}
        uid, driver = meta["uid"], self.driver
        rescue = spec.get("rescue") or {}
        if rescue.get("enabled"):
            driver.rescue(uid, ImageRef(rescue["image"]))
        else:
            driver.unrescue(uid)
        state = driver.get_info(uid).state
        status = body.get("status") or {}
        stopped = want != "Stopped" and state in (PowerState.SHUTOFF, PowerState.CRASHED)
        if (
            stopped
            and status.get("powerState") not in (None, "Stopped", "Crashed", "NoState")
            and status.get("observedGeneration") == meta.get("generation")
        ):
            # Stopped since the last status, with no spec change: outside Kubernetes (a lifecycle
            # event this handle got ahead of, or one lost while the agent or libvirt was down).
            self._stopped_outside.setdefault(uid, time.monotonic())
        if uid in self._stopped_outside and stopped:
            if time.monotonic() - self._stopped_outside[uid] < self.settings.restart_delay:
                return  # _restart_later_if_needed brings it back after the delay
        self._stopped_outside.pop(uid, None)
        self._power(uid, want, state)

    def _still_here(self, body: dict[str, Any]) -> bool:
        """Whether the newest version of the object is still bound to this node (BeingDeleted when it is,
        but is being deleted).

        Asked before a domain is created, the one act a stale copy must never cause: after a migration
        whose label change this agent missed, it would start a second copy of a guest running elsewhere.
        """
        meta = body["metadata"]
        try:
            fresh = typed(
                self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, meta["namespace"], VIRTUALINSTANCES, meta["name"]
                )
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        if (
            fresh["metadata"]["uid"] != meta["uid"]
            or (fresh["metadata"].get("labels") or {}).get(NODE_LABEL) != self.node
        ):
            return False
        body.clear()
        body.update(fresh)
        if fresh["metadata"].get("deletionTimestamp"):  # still ours to let go: our finalizer holds it
            raise BeingDeleted()
        return True

    def _power(self, uid: str, want: str, state: PowerState) -> None:
        driver = self.driver
        if want == "Stopped":
            if state is not PowerState.SHUTOFF:
                driver.power_off(uid)
                faults.point("power.stopped")
            return
        if state is PowerState.SUSPENDED and want != "Suspended":
            driver.resume(uid)
            state = driver.get_info(uid).state
        if want == "Running":
            if state is PowerState.PAUSED:
                driver.unpause(uid)
            elif state is not PowerState.RUNNING:
                driver.power_on(uid)
        elif want == "Paused":
            if state in (PowerState.SHUTOFF, PowerState.CRASHED, PowerState.NOSTATE):
                driver.power_on(uid)
            if driver.get_info(uid).state is not PowerState.PAUSED:
                driver.pause(uid)
        elif want == "Suspended" and state is not PowerState.SUSPENDED:
            if state in (PowerState.SHUTOFF, PowerState.CRASHED, PowerState.NOSTATE):
                driver.power_on(uid)
            driver.suspend(uid)

    def _observed(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The status fields that follow from what libvirt reports now (no ever-changing counters)."""
        meta, spec = body["metadata"], body.get("spec") or {}
        status = body.get("status") or {}
        uid, generation = meta["uid"], meta.get("generation")
        want = spec.get("powerState", "Running")
        patch: dict[str, Any] = {
            "node": self.node,
            "domainUUID": uid,
            "observedGeneration": generation,
            "console": {"node": self.node, "logFile": f"{uid}/console.log"},
        }
        try:
            info = self.driver.get_info(uid)
        except InstanceNotFound:
            patch.update({"powerState": PowerState.NOSTATE.value, "phase": "Pending"})
            set_condition(
                patch,
                status,
                "Ready",
                False,
                "DomainMissing",
                f"no libvirt domain for this instance on {self.node}",
                generation,
            )
            return patch
        power = info.state.value
        if (spec.get("vnc") or {}).get("enabled") and info.state is PowerState.RUNNING:
            try:
                console = self.driver.get_vnc_console(uid)
                patch["vnc"] = {
                    "host": console.host,
                    "port": console.port,
                    "passwordSecretRef": {"name": vnc_secret_name(meta["name"])},
                }
            except DriverError as exc:
                log.warning("no VNC endpoint for %s: %s", uid, exc)
        rescued = bool((spec.get("rescue") or {}).get("enabled")) and info.state is PowerState.RUNNING
        patch.update(
            {
                "powerState": power,
                "phase": "Rescued" if rescued else PHASES[info.state],
                "flavor": {"vcpus": info.num_cpu, "memoryMiB": info.max_mem_kib // 1024},
                "info": {**(status.get("info") or {}), "maxMemKiB": info.max_mem_kib, "vcpus": info.num_cpu},
            }
        )
        if power == want:
            set_condition(
                patch, status, "Ready", True, "PowerStateReached", f"the domain is {power}", generation
            )
        elif meta["uid"] in self._stopped_outside:
            set_condition(
                patch,
                status,
                "Ready",
                False,
                "StoppedOutsideKubernetes",
                f"the domain became {power} without a spec change (guest shutdown, crash or virsh); "
                f"the agent starts it again in {self.settings.restart_delay:.0f}s because the spec "
                f"asks for {want}",
                generation,
            )
        else:
            set_condition(
                patch,
                status,
                "Ready",
                False,
                "PowerStateDiffers",
                f"the domain is {power}, the spec asks for {want}",
                generation,
            )
        # Pending changes appear only with a spec change (a new generation) and go only with a boot, which
        # the condition then present asks about: most looks need neither question.
        ask = condition(status, "RestartRequired") or status.get("observedGeneration") != generation
        try:
            interfaces = (
                self._interfaces(uid, spec) if spec.get("interfaces") or status.get("interfaces") else []
            )
            pending = self.driver.pending_changes(uid) if ask else []
        except DriverError as exc:  # the domain went away meanwhile: the next look says so
            log.warning("cannot read the interfaces or pending changes of %s: %s", uid, exc)
            return patch
        if interfaces or status.get("interfaces"):
            patch["interfaces"] = interfaces or None
        if pending:
            set_condition(
                patch,
                status,
                "RestartRequired",
                True,
                "SpecChangedWhileRunning",
                f"{', '.join(pending)} changed while the domain runs; it takes them at its next boot "
                "(stop and start it, or a Hard reboot); until then it runs as before",
                generation,
            )
        elif condition(status, "RestartRequired"):
            drop_condition(patch, status, "RestartRequired")
        return patch

    def _interfaces(self, uid: str, spec: Mapping[str, Any]) -> list[dict[str, str]]:
        """Each interface's MAC as the domain has it, under its spec name (domains that do not say: by
        order)."""
        named = [i["name"] for i in spec.get("interfaces") or []]
        return [
            {
                "name": d.name or (named[index] if index < len(named) else f"#{index}"),
                "macAddress": d.mac,
                "network": d.network,
            }
            for index, d in enumerate(self.driver.list_interfaces_detail(uid))
        ]

    def _restart_later_if_needed(self, body: Mapping[str, Any]) -> None:
        uid = body["metadata"]["uid"]
        if uid in self._stopped_outside:
            left = self.settings.restart_delay - (time.monotonic() - self._stopped_outside[uid])
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
        want = (body.get("spec") or {}).get("powerState", "Running")
        if state.value == status.get("powerState"):
            return
        if want != "Stopped" and state in (PowerState.SHUTOFF, PowerState.CRASHED, PowerState.NOSTATE):
            self._stopped_outside.setdefault(uid, time.monotonic())
        self.write(body, self._observed(body))
        self._restart_later_if_needed(body)

    # --- one-shot actions -----------------------------------------------------------------

    def _actions(self, body: dict[str, Any]) -> bool:
        """Act once per new id; "InProgress" is written first, so a restart never repeats an action.

        Returns whether this call acted on anything.
        """
        spec, uid = body.get("spec") or {}, body["metadata"]["uid"]
        acted = False
        for kind in ACTIONS:
            request = (spec.get("actions") or {}).get(kind)
            if not request:
                continue
            ack = ((body.get("status") or {}).get("actions") or {}).get(kind) or {}
            if ack.get("id") == request["id"] and ack.get("phase") != "InProgress":
                continue  # done already
            done = self._acted.get((uid, kind))
            if done is None or done[0] != request["id"]:
                # InProgress with this id, yet not acted on by this process: an earlier agent process
                # started it, and it may or may not have happened.
                interrupted = ack.get("id") == request["id"]
                if not interrupted:
                    self.write(
                        body,
                        {
                            "actions": {
                                kind: {
                                    "id": request["id"],
                                    "phase": "InProgress",
                                    "message": f"{kind} started",
                                }
                            }
                        },
                    )
                try:
                    message = getattr(self, f"_do_{kind}")(body, uid, request, interrupted)
                    result = {"phase": "Succeeded", "message": message}
                except (DriverError, WaitFor) as exc:
                    result = {"phase": "Failed", "message": str(exc)}
                    self.events.warn(
                        body, f"{kind[0].upper()}{kind[1:]}Failed", f"{kind} {request['id']}: {exc}"
                    )
                done = (request["id"], {"completionTime": now(), **result})
                self._acted[(uid, kind)] = done
                acted = True
            # Acted on here; if this write fails (apiserver away), the retry writes it, never acts again.
            self.write(body, {"actions": {kind: {"id": request["id"], **done[1]}}})
        return acted

    def _do_reboot(
        self, body: Mapping[str, Any], uid: str, request: Mapping[str, Any], interrupted: bool
    ) -> str:
        if interrupted:
            state = self.driver.get_info(uid).state.value
            raise DriverError(
                f"the agent restarted during this reboot, so whether it finished is unknown (the "
                f"domain is {state}); request another reboot with a new id if it is still needed"
            )
        try:
            done = self.driver.reboot(uid, RebootType(request["type"]), self.settings.soft_reboot_timeout)
        except InstanceNotRunning as exc:
            raise DriverError(f"cannot reboot: {exc}") from exc
        if done is RebootType.HARD and request["type"] == "Soft":
            return (
                f"the guest ignored the ACPI shutdown for {self.settings.soft_reboot_timeout:.0f}s; "
                "rebooted hard"
            )
        return f"rebooted ({request['type'].lower()})"

    def _do_snapshot(
        self, body: dict[str, Any], uid: str, request: Mapping[str, Any], interrupted: bool
    ) -> str:
        name = request["imageName"]
        if interrupted and (self.images.root / name).is_file():
            return f"image {name} is in the image store"
        last = [0.0]

        def progress(percent: int) -> None:
            if time.monotonic() - last[0] >= 2.0 and percent < 100:  # a bounded write rate
                last[0] = time.monotonic()
                self.write(
                    body,
                    {
                        "actions": {
                            "snapshot": {"id": request["id"], "phase": "InProgress", "progress": percent}
                        }
                    },
                )

        self.driver.snapshot(uid, name, progress)
        faults.point("snapshot.written")
        return f"image {name} is in the image store"

    def _do_passwordReset(
        self, body: Mapping[str, Any], uid: str, request: Mapping[str, Any], interrupted: bool
    ) -> str:
        spec = body.get("spec") or {}
        password = self.secret(
            body["metadata"]["namespace"],
            spec.get("adminPasswordSecretRef"),
            "spec.adminPasswordSecretRef",
            "password",
        )
        if password is None:
            raise WaitFor("SecretMissing", "spec.adminPasswordSecretRef is not set")
        self.driver.set_admin_password(uid, password)
        return "the guest's admin password was set"

    def vnc_password(self, body: Mapping[str, Any]) -> str | None:
        """The instance's VNC password, kept in the Secret <name>-vnc (made once, owned by the instance).

        Kept in a Secret rather than status, so that reading it takes the same RBAC as reading any
        Secret of the namespace, and so that a restarted agent or a migration target finds the same one.
        """
        meta = body["metadata"]
        if not ((body.get("spec") or {}).get("vnc") or {}).get("enabled"):
            return None
        name = vnc_secret_name(meta["name"])
        password = "".join(
            secrets.choice(string.ascii_letters + string.digits) for _ in range(8)
        )  # VNC's limit
        try:
            self.core.create_namespaced_secret(
                meta["namespace"],
                kubernetes.client.V1Secret(
                    metadata=kubernetes.client.V1ObjectMeta(
                        name=name,
                        labels={f"{GROUP}/vnc-for": meta["uid"]},  # a name may be too long for a label
                        owner_references=[
                            kubernetes.client.V1OwnerReference(
                                api_version=f"{GROUP}/{VERSION}",
                                kind="VirtualInstance",
                                name=meta["name"],
                                uid=meta["uid"],
                            )
                        ],
                    ),
                    string_data={"password": password},
                ),
            )
            return password
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
        existing = self.core.read_namespaced_secret(name, meta["namespace"])
        data = (existing.data or {}).get("password")
        if data is None:  # a Secret of that name that kubenova did not make
            raise WaitFor(
                "SecretConflict",
                f"spec.vnc: Secret {name!r} exists without a 'password' key, so it is "
                "not the one kubenova keeps the VNC password in; rename or delete it",
            )
        return base64.b64decode(data).decode()

    def secret(
        self, namespace: str, ref: Mapping[str, Any] | None, field: str, default_key: str
    ) -> str | None:
        """A value from the Secret ``ref`` names (the field it came from, for messages); a missing one is
        waited for."""
        if not ref:
            return None
        key = ref.get("key", default_key)
        try:
            secret = self.core.read_namespaced_secret(ref["name"], namespace)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                raise WaitFor(
                    "SecretMissing",
                    f"{field}: Secret {ref['name']!r} does not exist in namespace {namespace}; create it",
                ) from exc
            raise
        data = (secret.data or {}).get(key)
        if data is None:
            raise WaitFor(
                "SecretMissing",
                f"{field}: Secret {ref['name']!r} has no key {key!r}; add it or set {field}.key",
            )
        try:
            return base64.b64decode(data).decode()
        except UnicodeDecodeError:
            raise WaitFor(
                "SecretInvalid", f"{field}: the key {key!r} of Secret {ref['name']!r} is not UTF-8 text"
            ) from None

    def driver_spec(self, instance: Mapping[str, Any], flavor: Mapping[str, Any]) -> InstanceSpec:
        """The driver's view of an instance with this flavor, its secrets read from their Secrets."""
        meta, spec = instance["metadata"], instance.get("spec") or {}
        namespace = meta["namespace"]
        password = self.secret(
            namespace, spec.get("adminPasswordSecretRef"), "spec.adminPasswordSecretRef", "password"
        )
        user_data = self.secret(
            namespace, spec.get("userDataSecretRef"), "spec.userDataSecretRef", "userData"
        )
        resolved = {
            **spec,
            "flavor": dict(flavor),
            **({"userData": user_data} if user_data is not None else {}),
        }
        return dataclasses.replace(
            instance_spec(
                meta["uid"],
                namespace,
                meta["name"],
                resolved,  # type: ignore[arg-type]
                self.images,
                password,
                self.vnc_password(instance),
            ),
            revision=definition_digest(spec, flavor),
        )

    # --- deletion -------------------------------------------------------------------------

    def _add_finalizer(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        fresh = typed(
            self.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                meta["namespace"],
                VIRTUALINSTANCES,
                meta["name"],
                {
                    "metadata": {
                        "finalizers": [*(meta.get("finalizers") or []), AGENT_FINALIZER],
                        "resourceVersion": meta["resourceVersion"],
                    }
                },
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
        remove_finalizer(self.custom, body, VIRTUALINSTANCES)

    # --- pollers --------------------------------------------------------------------------

    def poll(self) -> None:
        """Nova's periodic tasks: stuck reboots are finished hard, long rescues are pointed out."""
        for uid in self.driver.poll_rebooting_instances(self.settings.reboot_timeout):
            log.warning("reboot of %s is stuck; rebooting hard", uid)
            try:
                self.driver.reboot(uid, RebootType.HARD)
            except DriverError as exc:
                log.warning("hard reboot of %s failed: %s", uid, exc)
        if self.settings.rescue_timeout > 0:
            for uid in self.driver.poll_rescued_instances(self.settings.rescue_timeout):
                body = self.cache.objects.get(uid)
                if body is not None:
                    self.events.warn(
                        body,
                        "RescueTimeout",
                        f"in rescue for more than {self.settings.rescue_timeout:.0f}s; "
                        "set spec.rescue.enabled to false to boot normally",
                    )
