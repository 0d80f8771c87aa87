"""The power state machine: from what the spec asks and what libvirt reports, what to do and what to say.

Pure functions of (spec, status, observed state); the instance reconciler reads the state, carries
out the steps on the driver and writes what ``readiness`` and ``phase`` say.

``spec.runStrategy`` takes KubeVirt's names and meanings onto ``spec.powerState``: ``Halted`` is
powerState Stopped; ``Always`` (the default, and what kubenova always did) starts a guest that
stopped outside Kubernetes again after the restart delay; ``RerunOnFailure`` does so only when it
failed (QEMU crashed or was killed), not when the guest shut itself down; ``Manual`` never does.
A guest left stopped starts again with a spec change (powerState Stopped, then Running).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from kubenova.driver.base import PowerState

#: States in which the domain does not run.
STOPPED = (PowerState.SHUTOFF, PowerState.CRASHED, PowerState.NOSTATE)

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


class PowerStep(enum.Enum):
    """One driver call; the value is the ComputeDriver method's name."""

    POWER_OFF = "power_off"
    POWER_ON = "power_on"
    PAUSE = "pause"
    UNPAUSE = "unpause"
    SUSPEND = "suspend"
    RESUME = "resume"


@dataclasses.dataclass(frozen=True)
class PowerPlan:
    """The steps to take in order; ``look_again``: read the state afterwards and plan anew, because what
    the steps lead to is not certain (a domain saved while paused resumes paused)."""

    steps: tuple[PowerStep, ...] = ()
    look_again: bool = False


def wanted(spec: Mapping[str, Any]) -> str:
    """The power state the spec asks for: runStrategy Halted means Stopped, whatever powerState says."""
    if spec.get("runStrategy") == "Halted":
        return "Stopped"
    return str(spec.get("powerState", "Running"))


def restarts(strategy: str, state: PowerState) -> bool:
    """Whether a guest found ``state`` after stopping outside Kubernetes is started again (after the
    delay): under Always always, under RerunOnFailure only after a failure, under Manual never."""
    if strategy == "Manual":
        return False
    if strategy == "RerunOnFailure":
        return state is PowerState.CRASHED
    return True


def power_plan(want: str, state: PowerState) -> PowerPlan:
    """How to get from ``state`` to the spec's powerState ``want`` (Running, Stopped, Paused, Suspended)."""
    if want == "Stopped":
        return PowerPlan((PowerStep.POWER_OFF,) if state is not PowerState.SHUTOFF else ())
    if state is PowerState.SHUTDOWN:
        # On its way down (a guest shutdown, or a destroy under way: libvirt reports it while QEMU goes).
        # Starting it now would bring it back behind the stop, unseen; the stop's lifecycle event brings
        # the next look, which says "stopped outside Kubernetes" and restarts it after the delay.
        return PowerPlan()
    if state is PowerState.SUSPENDED and want != "Suspended":
        return PowerPlan((PowerStep.RESUME,), look_again=True)
    if want == "Running":
        if state is PowerState.PAUSED:
            return PowerPlan((PowerStep.UNPAUSE,))
        return PowerPlan((PowerStep.POWER_ON,) if state is not PowerState.RUNNING else ())
    if want == "Paused":
        if state in STOPPED:
            return PowerPlan((PowerStep.POWER_ON,), look_again=True)
        return PowerPlan((PowerStep.PAUSE,) if state is not PowerState.PAUSED else ())
    if want == "Suspended" and state is not PowerState.SUSPENDED:
        if state in STOPPED:
            return PowerPlan((PowerStep.POWER_ON, PowerStep.SUSPEND))
        return PowerPlan((PowerStep.SUSPEND,))
    return PowerPlan()


@dataclasses.dataclass(frozen=True)
class PowerDecision:
    """``plan`` None: leave the domain stopped for now (the restart delay runs). ``stopped_since``: when
    the domain stopped outside Kubernetes, to remember while the delay runs; None: nothing to remember."""

    plan: PowerPlan | None
    stopped_since: float | None


def follow(
    want: str,
    state: PowerState,
    status: Mapping[str, Any],
    generation: int | None,
    stopped_since: float | None,
    now: float,
    restart_delay: float,
    strategy: str = "Always",
) -> PowerDecision:
    """What a look at the instance does about its power state.

    A domain found stopped while the spec asks it to run, since the last status and without a spec
    change, was stopped outside Kubernetes (a guest shutdown, a crash, virsh; or a lifecycle event lost
    while the agent or libvirt was down): it is started again only after ``restart_delay``, so the stop
    is visible and a crashing guest cannot spin.
    """
    stopped = want != "Stopped" and state in (PowerState.SHUTOFF, PowerState.CRASHED)
    if (
        stopped
        and not restarts(strategy, state)
        and status.get("powerState") in ("Stopped", "Crashed")
        and status.get("observedGeneration") == generation
    ):  # left stopped before, as the strategy says (also across an agent restart, which forgot when)
        return PowerDecision(None, stopped_since if stopped_since is not None else now)
    if stopped_since is None and unsaid_stop(want, state, status, generation):
        stopped_since = now
    if (
        stopped
        and stopped_since is not None
        and (now - stopped_since < restart_delay or not restarts(strategy, state))
    ):
        return PowerDecision(None, stopped_since)
    return PowerDecision(power_plan(want, state), None)


def unsaid_stop(want: str, state: PowerState, status: Mapping[str, Any], generation: int | None) -> bool:
    """Whether ``state`` is a stop against the spec that the status, which last said the domain ran (for
    this generation), does not know of: one made outside Kubernetes."""
    return (
        want != "Stopped"
        and state in (PowerState.SHUTOFF, PowerState.CRASHED)
        and status.get("powerState") not in (None, "Stopped", "Crashed", "NoState")
        and status.get("observedGeneration") == generation
    )


def stopped_against_spec(want: str, state: PowerState) -> bool:
    """Whether a lifecycle event shows the domain stopped while the spec asks it to run or pause."""
    return want != "Stopped" and state in STOPPED


def phase(state: PowerState, rescued: bool) -> str:
    """status.phase: Rescued while a rescue boot runs, else the phase of the power state."""
    return "Rescued" if rescued and state is PowerState.RUNNING else PHASES[state]


def readiness(
    want: str, power: str, stopped_outside: bool, restart_delay: float, strategy: str = "Always"
) -> tuple[bool, str, str]:
    """The Ready condition (status, reason, message): the reported ``power`` state against the spec's."""
    if power == want or (want == "Stopped" and power == PowerState.CRASHED.value):  # a crash stopped it
        return True, "PowerStateReached", f"the domain is {power}"
    if stopped_outside and not restarts(strategy, PowerState(power)):
        return (
            False,
            "StoppedOutsideKubernetes",
            f"the domain became {power} without a spec change; spec.runStrategy {strategy} leaves it so: "
            "set spec.powerState to Stopped, then to Running, to start it",
        )
    if stopped_outside:
        return (
            False,
            "StoppedOutsideKubernetes",
            f"the domain became {power} without a spec change (guest shutdown, crash or virsh); "
            f"the agent starts it again in {restart_delay:.0f}s because the spec asks for {want}",
        )
    return False, "PowerStateDiffers", f"the domain is {power}, the spec asks for {want}"
