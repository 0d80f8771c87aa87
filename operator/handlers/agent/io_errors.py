"""Guests the hypervisor paused on a disk I/O error: said once, let run again after a growing delay.

QEMU stops a guest whose disk write fails for want of space rather than fail the write inside it (its
default ``werror=enospc``); libvirt reports the domain PAUSED, reason IOERROR. Letting it run again retries
the write, so while the file system is still full the guest stops again at once. The power follow unpaused
every Paused domain whose spec says Running at once, which turned a full disk into a loop of resumes, each
with two status writes and two Events. Here a resume waits instead: ``first_delay`` after the pause, then
twice as long after each resume that ended in another I/O error, at most ``max_delay``. The Ready condition
says why and what fixes it in words that stay the same from one round to the next (no counters, no times),
so status changes only when the domain's state does: at most two writes and two Events per resume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

#: The Ready condition's reason, and the Warning's.
REASON = "IOError"
#: A look scheduled for a resume comes this much after it is due, so it never finds it just short of due.
LOOK_MARGIN = 0.1


def message(node: str) -> str:
    """The Ready condition's message: the cause and the fix, the same every round."""
    return (
        f"the guest stopped on a disk I/O error: the file system of its disks on {node} is full (or "
        "failing). Free space in the node's instances folder (the agent's --instances-dir), or move the "
        "instance to another node with a cold Migration; while the spec asks for Running, the agent lets "
        "it run again after a delay that doubles each time it stops again"
    )


@dataclasses.dataclass
class _Episode:
    """One guest's run of I/O-error pauses: when it may be resumed next, after which wait."""

    due: float
    delay: float
    #: a look at ``due`` is scheduled already
    looked: bool = False


class IOErrorRetries:
    """When each guest paused on an I/O error may run again (the agent's work queue brings the look)."""

    def __init__(
        self,
        first_delay: float,
        max_delay: float,
        schedule: Callable[[str, float], None],
        clock: Callable[[], float],
    ) -> None:
        """``schedule(uid, seconds)`` asks for a look at the instance then; ``clock`` is monotonic."""
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._schedule = schedule
        self._clock = clock
        self._episodes: dict[str, _Episode] = {}

    def hold(self, uid: str, paused: bool) -> bool:
        """Whether the power follow must leave the instance paused for now.

        ``paused``: the domain is paused on an I/O error and the spec asks for Running. False (resume
        it) once its delay is over; the next wait is then twice as long. A guest found running after
        the whole of its last delay had no new error since, and starts afresh from ``first_delay``.
        """
        now = self._clock()
        episode = self._episodes.get(uid)
        if not paused:
            if episode is not None and now >= episode.due:
                del self._episodes[uid]
            return False
        if episode is None:
            episode = self._episodes[uid] = _Episode(now + self.first_delay, self.first_delay)
        if now < episode.due:
            if not episode.looked:
                episode.looked = True
                self._schedule(uid, episode.due - now + LOOK_MARGIN)
            return True
        delay = min(episode.delay * 2, self.max_delay)
        self._episodes[uid] = _Episode(now + delay, delay)
        return False

    def forget(self, uid: str) -> None:
        self._episodes.pop(uid, None)
