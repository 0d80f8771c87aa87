"""What the driver does through the QEMU guest agent in a guest: set a password, say what the guest is and
how it sees its network, and freeze its file systems around a snapshot's copy.

Every call is bounded (guest.py's AGENT_TIMEOUT), and asked only of a running guest whose agent has
connected its channel (read from the domain's XML first): a guest without an agent costs no wait, and a
hung one seconds. A guest frozen here is always thawed; one a thaw failed for is thawed again at the next
look, and one a dead agent process may have left frozen is thawed by ``unquiesce`` when the agent starts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from kubenova.driver.base import (
    DriverError,
    GuestAddress,
    GuestAgentInfo,
    GuestAgentUnavailable,
    GuestNIC,
    InstanceNotRunning,
    PowerState,
)
from kubenova.driver.checks import GUEST_PAUSED, not_running_reason
from kubenova.driver.libvirt.core import LibvirtCore
from kubenova.driver.libvirt.guest import Guest

log = logging.getLogger(__name__)
#: A thaw that fails is tried this often before the snapshot says the guest may still be frozen.
THAW_ATTEMPTS = 3


def guest_nic(name: str, answer: Mapping[str, Any]) -> GuestNIC:
    """One interface of libvirt's interfaceAddresses answer (``hwaddr``, ``addrs``: ``addr``, ``prefix``)."""
    addresses = []
    for entry in answer.get("addrs") or ():
        try:
            addresses.append(GuestAddress(str(entry["addr"]), int(entry["prefix"])))
        except (KeyError, TypeError, ValueError):
            continue  # a malformed entry says nothing
    return GuestNIC(name=str(name), mac=str(answer.get("hwaddr") or ""), addresses=tuple(addresses))


class GuestAgentAccess(LibvirtCore):
    """The contract's verbs through the guest agent, and the freeze around a snapshot."""

    def set_admin_password(self, uuid: str, password: str, user: str = "root") -> None:
        guest = self._running(uuid, "set_admin_password")
        guest.require_agent()
        guest.set_user_password(user, password)

    def get_guest_agent_info(self, uuid: str) -> GuestAgentInfo:
        guest = self._running(uuid, "get_guest_agent_info")
        if guest.state() is not PowerState.RUNNING:
            raise GuestAgentUnavailable(GUEST_PAUSED)
        guest.require_agent()
        if uuid in self._thaw_due:  # a snapshot's thaw failed: try again before anything else
            self._thaw(uuid, guest, attempts=1)
        os = guest.guest_info()
        nics = guest.agent_interfaces()
        return GuestAgentInfo(
            os_id=os.get("os.id", ""),
            os_name=os.get("os.name", ""),
            os_pretty_name=os.get("os.pretty-name", ""),
            os_version=os.get("os.version", ""),
            kernel_release=os.get("os.kernel-release", ""),
            hostname=os.get("hostname", ""),
            interfaces=tuple(guest_nic(name, answer) for name, answer in nics.items()),
        )

    def unquiesce(self, uuid: str) -> None:
        with self._lock:
            if uuid in self._frozen:  # a snapshot here holds it frozen, and thaws it itself
                return
        try:
            guest = self._running(uuid, "unquiesce")
        except InstanceNotRunning:
            return  # a stopped guest has nothing frozen
        if guest.state() is PowerState.RUNNING:
            guest.require_agent()
            self._thaw(uuid, guest, attempts=1)

    @contextlib.contextmanager
    def _quiesced(self, uuid: str, guest: Guest, state: PowerState) -> Iterator[tuple[bool, str]]:
        """Freeze the guest's file systems for the block's length when its agent answers; yields whether
        they are frozen and, when not, why. Always thawed afterwards, whatever the block raised."""
        if state is not PowerState.RUNNING:
            yield False, not_running_reason(state)
            return
        with self._lock:
            self._frozen.add(uuid)
        frozen = False
        try:
            frozen, reason = self._freeze(uuid, guest)
            yield frozen, reason
        finally:
            try:
                if frozen:
                    self._thaw(uuid, guest)
            finally:
                with self._lock:
                    self._frozen.discard(uuid)

    def _freeze(self, uuid: str, guest: Guest) -> tuple[bool, str]:
        try:
            guest.require_agent()
        except GuestAgentUnavailable as exc:
            return False, f"no QEMU guest agent answered ({exc})"
        try:
            count = guest.freeze_filesystems()
        except DriverError as exc:
            # Some may be frozen (an answer that came too late is a freeze all the same): thaw them, or
            # have the next look try.
            with contextlib.suppress(DriverError):
                self._thaw(uuid, guest, attempts=1)
            if isinstance(exc, GuestAgentUnavailable):
                return False, f"no QEMU guest agent answered ({exc})"
            return False, f"the guest agent could not freeze the guest's file systems: {exc}"
        if count == 0:  # qemu-ga still counts itself frozen, and answers nothing but a thaw
            with contextlib.suppress(DriverError):
                self._thaw(uuid, guest, attempts=1)
            return False, "the guest agent froze no file system"
        return True, ""

    def _thaw(self, uuid: str, guest: Guest, attempts: int = THAW_ATTEMPTS) -> None:
        """Thaw, trying ``attempts`` times; when all fail, the guest is thawed again at the next look."""
        error: DriverError | None = None
        for _ in range(attempts):
            try:
                guest.thaw_filesystems()
            except DriverError as exc:
                log.warning("thawing the file systems of %s failed: %s", uuid, exc)
                error = exc
                continue
            with self._lock:
                self._thaw_due.discard(uuid)
            return
        with self._lock:
            self._thaw_due.add(uuid)
        raise DriverError(
            f"the guest's file systems may still be frozen: thawing them failed ({error}); the agent tries "
            "again at its next look at the guest"
        )
