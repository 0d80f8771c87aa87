"""status.guestAgent: what the QEMU guest agent in each running guest says of it, on a queue of its own.

Asking a guest's agent may take seconds (a hung one costs the driver's timeout), so this work never runs
on the agent's main work queue, where it would hold up spawns and power changes: a queue of its own
(GUEST_WORKERS threads) looks at one instance per key. Keys come from the periodic look (the agent's
``--guest-agent-interval``) and from libvirt's agent lifecycle event (an agent connected or went away),
the latter at most once per EVENT_SPACING per instance, so a guest that starts and stops its agent in a
loop cannot make the agent write status in a loop. Status is written only when what the agent says
changed, through the instance reconciler's writer, and only while the main queue does not work on the
instance (else later). The domain status clears it when the instance stops (domain_status.py).

A guest can say anything: every string is cut to MAX_TEXT printable characters, the lists to
MAX_INTERFACES and MAX_ADDRESSES, and what is not an address or a MAC is dropped, before status sees it.
Nothing in kubenova acts on these claims (status.ipAddresses is not filled from them).

The first look at each running guest after the agent starts thaws its file systems: an agent process
that died during a snapshot may have left them frozen (a thaw is harmless when none is).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import kubernetes
import urllib3

from kubenova.driver.base import (
    DriverError,
    GuestAddress,
    GuestAgentInfo,
    GuestAgentUnavailable,
    GuestNIC,
    InstanceNotFound,
    InstanceNotRunning,
)
from kubenova.handlers.agent.instances import InstanceAgent
from kubenova.handlers.agent.workqueue import WorkQueue

log = logging.getLogger(__name__)
#: Threads asking guest agents: a hung agent holds one for the driver's timeout, never the main queue.
GUEST_WORKERS = 2
#: Agent lifecycle events lead to one look per instance at most this often, in seconds.
EVENT_SPACING = 5.0
#: A look whose instance the main queue works on (a snapshot, a spawn) is tried again this much later.
BUSY_RETRY = 5.0
#: Bounds on what a guest's claims may take in status (the CRD says the same).
MAX_TEXT, MAX_INTERFACES, MAX_ADDRESSES = 256, 16, 16
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_NO_MAC = "00:00:00:00:00:00"
KEY = "guest"


def text(value: str) -> str:
    """At most MAX_TEXT printable characters of what a guest said (no control or escape characters)."""
    return "".join(char for char in value[: MAX_TEXT * 4] if char.isprintable())[:MAX_TEXT]


def address(claim: GuestAddress) -> dict[str, Any] | None:
    """One address as status shows it; None for what is no address, or a loopback one."""
    try:
        ip = ipaddress.ip_address(claim.address.split("%", 1)[0])  # an IPv6 scope is the guest's own
    except ValueError:
        return None
    if ip.is_loopback or not 0 <= claim.prefix <= ip.max_prefixlen:
        return None
    return {"address": str(ip), "prefix": claim.prefix}


def mac_of(nic: GuestNIC) -> str:
    """The interface's MAC in lower case; "" for what is no MAC."""
    mac = nic.mac[:18].lower()
    return mac if _MAC.fullmatch(mac) else ""


def interface(nic: GuestNIC) -> dict[str, Any] | None:
    """One interface as status shows it; None for the loopback (no MAC, no address but loopback ones)."""
    mac = mac_of(nic)
    found = [a for a in (address(claim) for claim in nic.addresses[: MAX_ADDRESSES * 4]) if a]
    if not found and mac in ("", _NO_MAC):
        return None
    entry: dict[str, Any] = {"name": text(nic.name)}
    if mac:
        entry["macAddress"] = mac
    if found:
        entry["ipAddresses"] = found[:MAX_ADDRESSES]
    return entry


def guest_status(info: GuestAgentInfo, known_macs: Collection[str] = ()) -> dict[str, Any]:
    """status.guestAgent of a guest whose agent answered, bounded; interfaces with a MAC the instance's own
    interfaces have come first (a guest with many container bridges still shows its own NICs)."""
    status: dict[str, Any] = {"connected": True}
    for key, value in (
        ("osID", info.os_id),
        ("osName", info.os_name),
        ("prettyName", info.os_pretty_name),
        ("osVersion", info.os_version),
        ("kernelRelease", info.kernel_release),
        ("hostname", info.hostname),
    ):
        if text(value):
            status[key] = text(value)
    known = {mac.lower() for mac in known_macs if mac}
    own = [nic for nic in info.interfaces if mac_of(nic) in known][:MAX_INTERFACES]
    rest = [nic for nic in info.interfaces[: MAX_INTERFACES * 4] if mac_of(nic) not in known]
    nics = own + sorted(rest, key=lambda nic: nic.name)
    interfaces = [entry for entry in (interface(nic) for nic in nics) if entry][:MAX_INTERFACES]
    if interfaces:
        status["interfaces"] = interfaces
    return status


def replacing(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch that makes ``old`` into ``new``: what ``new`` leaves out is removed."""
    return {**{key: None for key in old or {} if key not in new}, **new}


class GuestAgentWatch:
    """Keeps each running instance's status.guestAgent to what its guest agent says."""

    def __init__(
        self,
        instances: InstanceAgent,
        workers: int = GUEST_WORKERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.instances = instances
        self.queue = WorkQueue(workers, clock=clock)
        self.clock = clock
        self._lock = threading.Lock()
        self._thawed: set[str] = set()  # looked at since this process started: thawed once
        self._pending: set[str] = set()  # a look asked for by an event, not run yet
        self._next: dict[str, float] = {}  # when an event may next ask for a look at once
        instances.cache.on_forget(self._forget)

    def start(self) -> None:
        self.queue.start({KEY: self.refresh})

    def stop(self) -> None:
        self.queue.stop()

    def look_at_all(self) -> None:
        """The periodic look: every instance that status says runs."""
        for uid, body in list(self.instances.cache.objects.items()):
            if (body.get("status") or {}).get("powerState") == "Running":
                self.queue.add((KEY, uid))

    def notice(self, uid: str) -> None:
        """libvirt's agent lifecycle event (on its event thread: only asks for a look), spaced out."""
        now = self.clock()
        with self._lock:
            if uid in self._pending:
                return
            self._pending.add(uid)
            due = max(now, self._next.get(uid, now))
            self._next[uid] = due + EVENT_SPACING
        self.queue.add_after((KEY, uid), due - now)

    def _forget(self, uid: str) -> None:
        with self._lock:
            self._thawed.discard(uid)
            self._pending.discard(uid)
            self._next.pop(uid, None)
        self.queue.drop(uid)

    def refresh(self, uid: str) -> None:
        """Ask the guest's agent, and write status.guestAgent when its answer changed."""
        with self._lock:
            self._pending.discard(uid)
        agent = self.instances
        body = agent.cache.objects.get(uid) or {}
        meta = body.get("metadata")  # read outside the object's lock: a write may be replacing it
        if not meta or meta.get("deletionTimestamp") or agent.held(uid):
            return
        status = body.get("status") or {}
        if status.get("powerState") != "Running":
            return  # a paused guest's agent cannot answer; a stopped one's status is cleared elsewhere
        macs = [i.get("macAddress", "") for i in status.get("interfaces") or []]
        wanted = self._ask(uid, macs)
        if wanted is None or status.get("guestAgent") == wanted:
            return
        with agent.cache.queue.lock_if_free(uid) as held:
            if not held:
                self.queue.add_after((KEY, uid), BUSY_RETRY)
                return
            fresh = agent.cache.objects.get(uid)  # held now: no write replaces it meanwhile
            if fresh is None or (fresh.get("status") or {}).get("powerState") != "Running":
                return
            old = (fresh.get("status") or {}).get("guestAgent")
            try:
                agent.write(fresh, {"guestAgent": replacing(old, wanted)})
            except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError) as exc:
                log.warning(
                    "cannot write the guest agent's answer for %s: %s", uid, getattr(exc, "reason", exc)
                )

    def _ask(self, uid: str, macs: Collection[str]) -> dict[str, Any] | None:
        """status.guestAgent as the guest's agent answers now; None when there is nothing to say (the
        domain is gone or stopped meanwhile, or libvirt failed: the next look tries again)."""
        driver = self.instances.driver
        try:
            if uid not in self._thawed:
                driver.unquiesce(uid)
                with self._lock:
                    self._thawed.add(uid)
            info = driver.get_guest_agent_info(uid)
        except GuestAgentUnavailable:
            return {"connected": False}
        except (InstanceNotFound, InstanceNotRunning):
            return None
        except DriverError as exc:
            log.info("cannot ask the guest agent of %s: %s", uid, exc)
            return None
        return guest_status(info, macs)
