"""What status says about an instance's domain: read from the driver now, never ever-changing counters.

The power state, phase, Ready (from power.py, or io_errors.py for a guest paused on a full disk), the
flavor and memory the domain runs with, its VNC endpoint and interfaces, and RestartRequired while a spec
change waits for the next boot. status.guestAgent is guest_agent.py's, cleared here once the guest stops.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping
from typing import Any

from kubenova.driver.base import ComputeDriver, DriverError, InstanceNotFound, PowerState
from kubenova.handlers.agent import io_errors, power
from kubenova.handlers.agent.translate import spec_interfaces, vnc_secret_name
from kubenova.handlers.shared import condition, drop_condition, set_condition

log = logging.getLogger(__name__)


def unsaid_stop(body: Mapping[str, Any], state: PowerState) -> bool:
    """power.unsaid_stop for an instance found in ``state``: stopped against its spec while its status
    still says it runs."""
    meta, status = body["metadata"], body.get("status") or {}
    return power.unsaid_stop(power.wanted(body.get("spec") or {}), state, status, meta.get("generation"))


def observed_status(
    driver: ComputeDriver,
    node: str,
    body: Mapping[str, Any],
    stopped_outside: Callable[[PowerState], bool],
    restart_delay: float,
    leases: Callable[[], Mapping[str, str]],
) -> dict[str, Any]:
    """The status fields that follow from what libvirt reports now (no ever-changing counters).

    ``stopped_outside(state)``: whether the domain, found in ``state``, stopped outside Kubernetes and the
    agent starts it again after ``restart_delay``, which the Ready condition says. It is asked with the state
    read here, so that the agent can mark a stop this very look is the first to see (power.unsaid_stop).
    """
    meta, spec = body["metadata"], body.get("spec") or {}
    status = body.get("status") or {}
    uid, generation = meta["uid"], meta.get("generation")
    want = power.wanted(spec)
    patch: dict[str, Any] = {
        "node": node,
        "domainUUID": uid,
        "observedGeneration": generation,
        "console": {"node": node, "logFile": f"{uid}/console.log"},
    }
    try:
        info = driver.get_info(uid)
    except InstanceNotFound:
        patch.update({"powerState": PowerState.NOSTATE.value, "phase": "Pending"})
        if status.get("guestAgent"):
            patch["guestAgent"] = None
        set_condition(
            patch,
            status,
            "Ready",
            False,
            "DomainMissing",
            f"no libvirt domain for this instance on {node}",
            generation,
        )
        return patch
    power_state = info.state.value
    if status.get("guestAgent") and info.state not in (PowerState.RUNNING, PowerState.PAUSED):
        patch["guestAgent"] = None  # what a guest agent said holds only while the guest runs
    if (spec.get("vnc") or {}).get("enabled") and info.state is PowerState.RUNNING:
        try:
            console = driver.get_vnc_console(uid)
            patch["vnc"] = {
                "host": console.host,
                "port": console.port,
                "passwordSecretRef": {"name": vnc_secret_name(meta["name"])},
            }
        except DriverError as exc:
            log.warning("no VNC endpoint for %s: %s", uid, exc)
    rescued = bool((spec.get("rescue") or {}).get("enabled"))
    patch.update(
        {
            "powerState": power_state,
            "phase": power.phase(info.state, rescued),
            "flavor": {"vcpus": info.num_cpu, "memoryMiB": info.max_mem_kib // 1024},
            "info": {**(status.get("info") or {}), "maxMemKiB": info.max_mem_kib, "vcpus": info.num_cpu},
        }
    )
    ready, reason, message = power.readiness(
        want, power_state, stopped_outside(info.state), restart_delay, spec.get("runStrategy", "Always")
    )
    if info.io_error:  # whatever the spec asks, the guest cannot go on until its disk has room
        ready, reason, message = False, io_errors.REASON, io_errors.message(node)
    set_condition(patch, status, "Ready", ready, reason, message, generation)
    # Pending changes appear only with a spec change (a new generation) and go only with a boot, which
    # the condition then present asks about: most looks need neither question.
    ask = condition(status, "RestartRequired") or status.get("observedGeneration") != generation
    running = info.state in (PowerState.RUNNING, PowerState.PAUSED)
    try:
        has_interfaces = spec_interfaces(spec) or status.get("interfaces")
        known = {i.get("macAddress"): i.get("ipAddress") for i in status.get("interfaces") or []}
        interfaces = interfaces_of(driver, uid, spec, running, known, leases) if has_interfaces else []
        pending = driver.pending_changes(uid) if ask else []
    except DriverError as exc:  # the domain went away meanwhile: the next look says so
        log.warning("cannot read the interfaces or pending changes of %s: %s", uid, exc)
        return patch
    if interfaces or status.get("interfaces"):
        patch["interfaces"] = interfaces or None
    addresses = ip_addresses(interfaces, status.get("guestAgent") or {}) if running else []
    if addresses or status.get("ipAddresses"):
        patch["ipAddresses"] = addresses or None
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


def interfaces_of(
    driver: ComputeDriver,
    uid: str,
    spec: Mapping[str, Any],
    running: bool,
    known: Mapping[str | None, str | None],
    leases: Callable[[], Mapping[str, str]],
) -> list[dict[str, str]]:
    """Each interface's MAC as the domain has it, under its spec name (domains that do not say: by
    order), with the address the node network's DHCP leased to it (``leases``): while the guest is
    stopped, the one it had (``known``, by MAC), which its reservation keeps for its next boot, so a
    Service lists it as not ready rather than forgetting it."""
    named = [i["name"] for i in spec_interfaces(spec)]
    by_mac = leases() if running else {m.lower(): a for m, a in known.items() if m and a}
    found = []
    for index, d in enumerate(driver.list_interfaces_detail(uid)):
        entry = {"name": d.name or (named[index] if index < len(named) else f"#{index}"), "macAddress": d.mac}
        entry["network"] = d.network
        if by_mac.get(d.mac.lower()):
            entry["ipAddress"] = by_mac[d.mac.lower()]
        found.append(entry)
    return found


def ip_addresses(interfaces: list[dict[str, str]], guest_agent: Mapping[str, Any]) -> list[str]:
    """The leased addresses, then what the guest agent says its own interfaces (by MAC) have, but for
    link-local ones: the leases are the node's word, the rest the guest's."""
    found = [i["ipAddress"] for i in interfaces if i.get("ipAddress")]
    own = {i["macAddress"].lower() for i in interfaces}
    for nic in guest_agent.get("interfaces") or []:
        if (nic.get("macAddress") or "").lower() not in own:
            continue
        for claim in nic.get("ipAddresses") or []:
            address = claim.get("address", "")
            if address and address not in found and not ipaddress.ip_address(address).is_link_local:
                found.append(address)
    return found
