"""The agent's pure steps: spec translation, the power state machine, the one-shot action protocol."""

from __future__ import annotations

import pathlib

import pytest

from kubenova.driver.base import InvalidInstanceSpec, PowerState
from kubenova.driver.images import ImageStore
from kubenova.handlers.agent.actions import Due, answer, due, started
from kubenova.handlers.agent.power import PowerPlan, PowerStep, follow, phase, power_plan, readiness
from kubenova.handlers.agent.translate import (
    NetworkAllowList,
    SecretValues,
    definition_digest,
    driver_spec,
    vnc_secret_name,
)

S = PowerState
P = PowerStep


@pytest.mark.parametrize(
    "want, state, plan",
    [
        ("Running", S.RUNNING, PowerPlan()),
        ("Running", S.SHUTOFF, PowerPlan((P.POWER_ON,))),
        ("Running", S.CRASHED, PowerPlan((P.POWER_ON,))),
        ("Running", S.PAUSED, PowerPlan((P.UNPAUSE,))),
        ("Running", S.SUSPENDED, PowerPlan((P.RESUME,), look_again=True)),  # saved paused: resumes paused
        ("Stopped", S.SHUTOFF, PowerPlan()),
        ("Stopped", S.RUNNING, PowerPlan((P.POWER_OFF,))),
        ("Stopped", S.SUSPENDED, PowerPlan((P.POWER_OFF,))),
        ("Stopped", S.CRASHED, PowerPlan((P.POWER_OFF,))),
        ("Paused", S.PAUSED, PowerPlan()),
        ("Paused", S.RUNNING, PowerPlan((P.PAUSE,))),
        ("Paused", S.SHUTOFF, PowerPlan((P.POWER_ON,), look_again=True)),
        ("Paused", S.SUSPENDED, PowerPlan((P.RESUME,), look_again=True)),
        ("Suspended", S.SUSPENDED, PowerPlan()),
        ("Suspended", S.RUNNING, PowerPlan((P.SUSPEND,))),
        ("Suspended", S.PAUSED, PowerPlan((P.SUSPEND,))),
        ("Suspended", S.NOSTATE, PowerPlan((P.POWER_ON, P.SUSPEND))),
        # Being shut down (a destroy takes a second or two): wait for the stop, never start it behind it.
        ("Running", S.SHUTDOWN, PowerPlan()),
        ("Paused", S.SHUTDOWN, PowerPlan()),
        ("Suspended", S.SHUTDOWN, PowerPlan()),
        ("Stopped", S.SHUTDOWN, PowerPlan((P.POWER_OFF,))),
    ],
)
def test_the_power_plan_from_each_state(want: str, state: PowerState, plan: PowerPlan) -> None:
    assert power_plan(want, state) == plan


def test_a_stop_outside_kubernetes_waits_for_the_restart_delay() -> None:
    seen = {"powerState": "Running", "observedGeneration": 3}
    first = follow("Running", S.SHUTOFF, seen, 3, None, now=100.0, restart_delay=10.0)
    assert first.plan is None and first.stopped_since == 100.0
    later = follow("Running", S.SHUTOFF, seen, 3, 100.0, now=111.0, restart_delay=10.0)
    assert later.plan == PowerPlan((P.POWER_ON,)) and later.stopped_since is None
    # A spec change since the last status: the stop was asked for, nothing to wait for.
    assert follow("Running", S.SHUTOFF, seen, 4, None, now=100.0, restart_delay=10.0).plan is not None


def test_phase_and_ready_say_what_runs() -> None:
    assert phase(S.RUNNING, rescued=True) == "Rescued" and phase(S.SHUTOFF, rescued=True) == "Stopped"
    assert phase(S.BLOCKED, rescued=False) == "Running" and phase(S.CRASHED, rescued=False) == "Stopped"
    assert readiness("Running", "Running", False, 10.0)[:2] == (True, "PowerStateReached")
    assert readiness("Running", "Stopped", True, 10.0)[:2] == (False, "StoppedOutsideKubernetes")
    assert readiness("Paused", "Running", False, 10.0)[:2] == (False, "PowerStateDiffers")


def test_the_action_protocol_answers_each_id_once() -> None:
    reboot = {"id": "r1", "type": "Hard"}
    spec = {"actions": {"reboot": reboot}}
    assert due(spec, {}, {}) == [Due("reboot", reboot)]
    in_progress = {"actions": {"reboot": {"id": "r1", "phase": "InProgress"}}}
    assert due(spec, in_progress, {}) == [Due("reboot", reboot, interrupted=True)]  # an earlier process
    result = {"phase": "Succeeded", "message": "rebooted (hard)"}
    assert due(spec, in_progress, {"reboot": ("r1", result)}) == [Due("reboot", reboot, result=result)]
    assert due(spec, {"actions": {"reboot": {"id": "r1", "phase": "Succeeded"}}}, {}) == []
    assert started("reboot", reboot)["actions"]["reboot"]["phase"] == "InProgress"
    assert answer("reboot", reboot, result) == {"actions": {"reboot": {"id": "r1", **result}}}


def test_translation_takes_secret_values_and_digests_only_what_shapes_the_domain(
    tmp_path: pathlib.Path,
) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    spec = {
        "flavor": {"vcpus": 1, "memoryMiB": 64},
        "boot": {"kernel": {"image": "vmlinuz"}},
        "userData": "x",
    }
    body = {"metadata": {"uid": "u", "namespace": "ns", "name": "vm"}, "spec": spec}
    made = driver_spec(
        body,
        spec["flavor"],
        ImageStore(tmp_path),
        SecretValues("pw", "from-secret", "vnc"),
        NetworkAllowList(),
    )
    assert (made.admin_password, made.user_data, made.vnc_password) == ("pw", "from-secret", "vnc")
    assert made.boot is not None and made.boot.kernel == str(tmp_path / "vmlinuz")
    assert made.revision == definition_digest(spec, spec["flavor"])
    assert definition_digest({**spec, "powerState": "Stopped"}, spec["flavor"]) == made.revision
    assert definition_digest(spec, {"vcpus": 2, "memoryMiB": 64}) != made.revision
    assert vnc_secret_name("vm") == "vm-vnc" and len(vnc_secret_name("x" * 253)) == 253


def test_an_instance_joins_only_networks_open_to_its_namespace(tmp_path: pathlib.Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    networks = NetworkAllowList(("default",), {"lab-team": ("lab",)})

    def translated(namespace: str, *names: str) -> None:
        spec = {
            "flavor": {"vcpus": 1, "memoryMiB": 64},
            "boot": {"kernel": {"image": "vmlinuz"}},
            "interfaces": [{"name": f"eth{i}", "network": n} for i, n in enumerate(names)],
        }
        body = {"metadata": {"uid": "u", "namespace": namespace, "name": "vm"}, "spec": spec}
        driver_spec(body, spec["flavor"], ImageStore(tmp_path), SecretValues(None, None, None), networks)

    translated("anyone", "default")
    translated("lab-team", "default", "lab")
    with pytest.raises(InvalidInstanceSpec) as refused:
        translated("anyone", "default", "lab")
    assert refused.value.field == "spec.interfaces[1].network"
    assert "'lab' is not open to namespace anyone" in str(refused.value) and "agent.networks" in str(
        refused.value
    )


def test_the_computenode_allow_list_replaces_the_agents_flags() -> None:
    flags = NetworkAllowList(("default",), {"lab-team": ("lab",)})
    assert flags.configured(None) is flags and flags.configured({}) is flags
    closed = flags.configured({"default": []})
    assert closed == NetworkAllowList((), {})
    opened = flags.configured({"default": ["default"], "namespaces": {"other": ["lab", "lab2"]}})
    assert opened == NetworkAllowList(("default",), {"other": ("lab", "lab2")})
