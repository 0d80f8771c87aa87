"""VirtualInstance: placement (controller) and the domain's life on its node (agent)."""
from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Mapping
from typing import Any

import kopf
import kubernetes

from kubenova import api
from kubenova.driver.base import (
    ComputeDriver, DriverError, InstanceNotFound, InstanceSpec, InvalidInstanceSpec, KernelBoot, PowerState,
)
from kubenova.driver.images import ImageStore
from kubenova.handlers.common import GROUP, NODE_LABEL, VERSION, VIRTUALINSTANCES, condition, set_condition
from kubenova.handlers.placement import NodeView, Unschedulable, Usage, choose_node

log = logging.getLogger(__name__)


# --- controller: placement -------------------------------------------------------------------

def request_of(spec: Mapping[str, Any]) -> Usage:
    flavor = spec.get("flavor") or {}
    return Usage(int(flavor.get("vcpus", 1)), int(flavor.get("memoryMiB", 0)))


def node_view(name: str, labels: Mapping[str, str], spec: api.ComputeNodeSpec,
              status: api.ComputeNodeStatus) -> NodeView:
    beat = status.get("heartbeatTime")
    capacity = status.get("capacity") or {}
    return NodeView(
        name=name, enabled=bool(spec.get("enabled", True)),
        heartbeat=datetime.datetime.fromisoformat(beat.replace("Z", "+00:00")) if beat else None,
        vcpus=int(capacity.get("vcpus", 0)), memory_mib=int(capacity.get("memoryMiB", 0)),
        maintenance=bool(spec.get("maintenance", False)), labels=dict(labels))


def place(api: kubernetes.client.CustomObjectsApi, body: Mapping[str, Any], nodes: Mapping[str, NodeView],
          used: Mapping[str, Usage]) -> str | None:
    """Bind one unbound instance to a node and return it (None when it stays unbound).

    Binding writes: status first, then the label agents select on.

    The order matters: an agent sees the object only once the label is there, and by then
    the Scheduled condition is in status, so the agent's whole-list condition patch keeps it.
    A crash between the two writes is finished by the next event (status.node is reused).
    """
    meta, spec, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
    namespace, name = meta["namespace"], meta["name"]
    node = status.get("node")
    if not node:
        try:
            node = choose_node(request_of(spec), spec.get("nodeName"), nodes, used,
                               datetime.datetime.now(datetime.timezone.utc), spec.get("nodeSelector"))
        except Unschedulable as exc:
            cond = condition(status, "Scheduled")
            if cond and cond.get("reason") == "Unschedulable" and cond.get("message") == str(exc):
                return None  # already said; do not repeat the write or the Event
            patch: dict[str, Any] = {"phase": "Pending"}
            set_condition(patch, status, "Scheduled", False, "Unschedulable", str(exc), meta.get("generation"))
            api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, VIRTUALINSTANCES, name,
                                                      {"status": patch})
            kopf.warn(dict(body), reason="Unschedulable", message=str(exc))
            return None
        patch = {"node": node, "phase": "Scheduled"}
        set_condition(patch, status, "Scheduled", True, "Placed", f"placed on {node}", meta.get("generation"))
        try:
            api.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, VIRTUALINSTANCES, name,
                {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": patch})
        except kubernetes.client.ApiException as exc:
            if exc.status in (404, 409):  # gone, or changed meanwhile: the next event decides again
                return None
            raise
    api.patch_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, name,
                                       {"metadata": {"labels": {NODE_LABEL: node}}})
    log.info("bound %s/%s to %s", namespace, name, node)
    return str(node)


# --- agent: the domain on this node ----------------------------------------------------------

@dataclasses.dataclass
class AgentMemo:
    """What the agent's handlers share; passed to kopf as `memo`."""

    node: str
    driver: ComputeDriver
    images: ImageStore


#: Spec fields the API accepts but this agent does not act on yet; using one fails clearly
#: (condition Ready=False, reason Unsupported) instead of being silently ignored.
NOT_YET_IMPLEMENTED = ("boot.image", "rootDisk", "ephemeralDisks", "swap", "interfaces", "rescue", "userData",
                       "injectedFiles", "networkConfig", "adminPasswordSecretRef", "actions")
IMPLEMENTED_POWER_STATES = ("Running", "Stopped")


def unsupported(spec: api.VirtualInstanceSpec) -> list[str]:
    """The spec fields set here that this agent cannot honour yet, as user-facing paths."""
    found = []
    for path in NOT_YET_IMPLEMENTED:
        node: Any = spec
        for key in path.split("."):
            node = node.get(key) if isinstance(node, Mapping) else None
        if node not in (None, [], {}):
            found.append(f"spec.{path}")
    if spec.get("powerState", "Running") not in IMPLEMENTED_POWER_STATES:
        found.append(f"spec.powerState={spec.get('powerState')}")
    return found


def instance_spec(uid: str, namespace: str, name: str, spec: api.VirtualInstanceSpec,
                  images: ImageStore) -> InstanceSpec:
    """Translate the spec for the driver; names the offending field when the node cannot run it."""
    kernel = spec["boot"]["kernel"]
    initrd = kernel.get("initrd")
    flavor = spec["flavor"]
    return InstanceSpec(
        uuid=uid, name=name, namespace=namespace,
        vcpus=int(flavor["vcpus"]), memory_mib=int(flavor["memoryMiB"]),
        boot=KernelBoot(
            kernel=images.resolve("spec.boot.kernel.image", kernel["image"]),
            initrd=images.resolve("spec.boot.kernel.initrd", initrd) if initrd else None,
            cmdline=kernel.get("cmdline", "console=ttyS0")))


def write_observed(driver: ComputeDriver, uid: str, node: str, generation: int | None,
                   status: Mapping[str, Any], patch: kopf.Patch, want: str) -> None:
    """Put what libvirt reports into status; Ready means the power state matches the spec."""
    try:
        info = driver.get_info(uid)
    except InstanceNotFound:
        patch.status["powerState"] = PowerState.NOSTATE.value
        set_condition(patch.status, status, "Ready", False, "DomainMissing",
                      f"no libvirt domain for this instance on {node}", generation)
        return
    power = info.state.value
    patch.status.update({
        "node": node, "domainUUID": uid, "powerState": power, "observedGeneration": generation,
        "phase": "Running" if info.state is PowerState.RUNNING else "Stopped",
        "info": {"maxMemKiB": info.max_mem_kib, "memKiB": info.mem_kib, "vcpus": info.num_cpu,
                 "cpuTimeNs": info.cpu_time_ns},
    })
    ready = power == want
    set_condition(patch.status, status, "Ready", ready, "PowerStateReached" if ready else "PowerStateDiffers",
                  f"the domain is {power}" + ("" if ready else f", the spec asks for {want}"), generation)


def reconcile(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, uid: str,
              namespace: str, name: str, patch: kopf.Patch, memo: AgentMemo) -> None:
    """Make the domain match the spec: define and start it, or stop it."""
    driver = memo.driver
    want = spec.get("powerState", "Running")
    generation = meta.get("generation")

    def fail(reason: str, message: str) -> kopf.PermanentError:
        """Retrying cannot help until the spec changes: say so in status and an Event."""
        patch.status.update({"phase": "Failed", "node": memo.node})
        set_condition(patch.status, status, "Ready", False, reason, message, generation)
        kopf.warn(body, reason=reason, message=message)
        return kopf.PermanentError(message)

    missing = unsupported(spec)  # type: ignore[arg-type]
    if missing:
        raise fail("Unsupported", f"{', '.join(missing)}: not implemented by this kubenova agent yet; "
                                  "remove it from the spec to run the instance")
    try:
        if not driver.instance_exists(uid):
            driver.spawn(instance_spec(uid, namespace, name, spec, memo.images),  # type: ignore[arg-type]
                         power_on=want == "Running")
        elif want == "Running":
            driver.power_on(uid)
        else:
            driver.power_off(uid)
    except InvalidInstanceSpec as exc:
        raise fail("InvalidSpec", str(exc)) from exc
    except DriverError as exc:
        set_condition(patch.status, status, "Ready", False, "HypervisorError", str(exc), generation)
        kopf.warn(body, reason="HypervisorError", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=10) from exc
    write_observed(driver, uid, memo.node, generation, status, patch, want)


def register_agent(registry: kopf.OperatorRegistry) -> None:
    """The agent's handlers; the server-side label selector limits them to this node's objects."""
    resource = (GROUP, VERSION, VIRTUALINSTANCES)

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, registry=registry, field="spec")
    def reconcile_instance(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, uid: str,
                           namespace: str, name: str, patch: kopf.Patch, memo: AgentMemo, **_: Any) -> None:
        reconcile(body, spec, status, meta, uid, namespace, name, patch, memo)

    @kopf.timer(*resource, registry=registry, interval=30, idle=10)
    def resync_instance(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, uid: str, patch: kopf.Patch,
                        memo: AgentMemo, **_: Any) -> None:
        """Catch what changed outside Kubernetes; writes only when something differs."""
        if status.get("phase") == "Failed":
            return
        observed = kopf.Patch()
        write_observed(memo.driver, uid, memo.node, meta.get("generation"), status, observed,
                       spec.get("powerState", "Running"))
        changed = {k: v for k, v in observed.status.items()
                   if k != "info" and status.get(k) != v}
        if changed:
            patch.status.update(observed.status)

    @kopf.on.delete(*resource, registry=registry)
    def delete_instance(uid: str, memo: AgentMemo, **_: Any) -> None:
        try:
            memo.driver.destroy(uid)
        except DriverError as exc:
            raise kopf.TemporaryError(str(exc), delay=5) from exc
