"""When a live transfer must be made to end: at its deadline, or when pre-copy cannot keep up with the guest.

Pure: the source's progress callback hands each report of the driver to a ``TransferWatch``, which says
what to do; live_migration_steps.py does it. Without post-copy the deadline aborts the transfer (the guest
stays on the source). With post-copy the transfer is switched instead (libvirt's
virDomainMigrateStartPostCopy): at the deadline (KubeVirt's allowPostCopy), or earlier, as soon as a memory
pass after the first one begins with nearly as much left as the pass before it (Nova's first heuristic,
judged a pass at a time). Once switched nothing aborts it: no host holds the whole guest any more.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from kubenova.driver.base import Convergence, MigrationProgress

#: A memory pass that begins with at least this share of what the pass before it began with made no
#: headway: the guest writes memory about as fast as the link carries it.
STALLED = 0.9
PRE_COPY, POST_COPY = "PreCopy", "PostCopy"


class Action(enum.Enum):
    GO_ON = "go on"
    ABORT = "abort"
    POST_COPY = "switch to post-copy"


def convergence_of(spec: Mapping[str, Any], default: Convergence) -> Convergence:
    """The Migration's spec.convergence when it has one (its schema fills both fields), else the agent's."""
    given = spec.get("convergence")
    if given is None:
        return default
    return Convergence(auto_converge=bool(given.get("autoConverge")), post_copy=bool(given.get("postCopy")))


@dataclasses.dataclass
class TransferWatch:
    """One transfer's clock: its deadline (monotonic), the pass it last saw begin, and whether it was
    switched to post-copy (when, monotonic)."""

    started: float
    deadline: float
    convergence: Convergence
    #: (memory iteration, data remaining) when that iteration was first reported
    pass_start: tuple[int, int] = (0, 0)
    post_copy_at: float | None = None
    #: when progress was last written
    said: float = 0.0
    #: how much auto-converge slowed the guest at the last report
    throttle: int = 0

    def next(self, now: float, step: MigrationProgress) -> Action:
        """What the source does after this report."""
        self.throttle = step.cpu_throttle_percent
        if self.post_copy_at is not None:
            return Action.GO_ON  # it ends on its own, each page sent once; nothing may abort it
        stalled = self._stalled(step)
        if now > self.deadline:
            return Action.POST_COPY if self.convergence.post_copy else Action.ABORT
        # Auto-converge needs passes to slow the guest down; with it, post-copy waits for the deadline.
        if self.convergence.post_copy and not self.convergence.auto_converge and stalled:
            return Action.POST_COPY
        return Action.GO_ON

    def _stalled(self, step: MigrationProgress) -> bool:
        iteration, remaining = self.pass_start
        if step.iteration <= iteration:
            return False
        self.pass_start = (step.iteration, step.data_remaining)
        return iteration >= 2 and step.data_remaining >= STALLED * remaining

    def figures(self) -> dict[str, Any]:
        """What status.progress says of the mode: which one runs (and so which finished it), when it was
        switched, how much auto-converge slows the guest."""
        said: dict[str, Any] = {"mode": POST_COPY if self.post_copy_at is not None else PRE_COPY}
        if self.post_copy_at is not None:
            said["postCopyAfterMs"] = int((self.post_copy_at - self.started) * 1000)
        if self.convergence.auto_converge:
            said["cpuThrottlePercent"] = self.throttle
        return said


def how_it_ended(progress: Mapping[str, Any]) -> str:
    """The words a finished Migration's message adds about the mode, from its status.progress; none for a
    pre-copy that auto-converge did not have to slow."""
    if progress.get("mode") == POST_COPY:
        after = progress.get("postCopyAfterMs", 0) / 1000
        return f"; pre-copy could not keep up, so it converged with post-copy after {after:.0f} s"
    if progress.get("cpuThrottlePercent"):
        return (
            f"; converged with auto-converge, the guest's vCPUs slowed by {progress['cpuThrottlePercent']} %"
        )
    return ""
