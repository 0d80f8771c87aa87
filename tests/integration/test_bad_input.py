"""Generated hostile input (Hypothesis) against the real apiserver, controller and agent.

Every generated object is either refused when applied (with a message naming a field) or, once
accepted, ends with a status condition that says what is wrong or that it works; no handler
crashes on it, nothing retries in a storm, and every one of them can be deleted.
"""

from __future__ import annotations

import copy
import string
import time
from typing import Any

import kubernetes
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubenova.handlers.shared import GROUP, MIGRATIONS, VERSION, VIRTUALINSTANCES, VOLUMEATTACHMENTS
from testground import ground as testground
from testground import guest
from tests.helpers import REPORT, eventually, log_problems

EXAMPLES = 1000
HOSTILE = [
    "../../etc/shadow",
    "/etc/passwd",
    "..",
    ".",
    "a/../../b",
    "$(reboot)",
    "`id`",
    "; rm -rf /",
    "x\x00y",
    "ä漢字🙂",
    "-rf",
    "a" * 300,
    f"{guest.KERNEL}/../../../../etc/passwd",
    "%2e%2e%2f",
    "\n",
    " ",
    "",
    "*",
    "~root",
    "${HOME}",
    "'\"",
    "\\\\server\\share",
    "CON",
    "vm.",
    "UPPER",
    "x" * 64,
]
HOSTILE_INTS = [0, -1, 1, 2**31, 2**32 + 1, 2**53 + 1, 2**63, -(2**63), 10**30]

texts = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=80), st.text(string.printable, max_size=80))
ints = st.one_of(st.sampled_from(HOSTILE_INTS), st.integers(-(2**70), 2**70))
# No NaN or infinity: JSON has neither, so no client could send them (they are not spec input).
scalars = st.one_of(texts, ints, st.booleans(), st.none(), st.floats(allow_nan=False, allow_infinity=False))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(texts, scalars, max_size=3))
big_text = st.integers(1, 200_000).map(lambda n: "A" * n)
cross_ref = st.builds(
    lambda name, ns: {"name": name, "namespace": ns},
    st.sampled_from(["vm", "other"]),
    st.sampled_from(["kube-system", "default", "t-x"]),
)

VI: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "VirtualInstance",
    # Stopped: an accepted spec is defined (disks, config drive, domain) but no guest boots.
    "spec": {
        "powerState": "Stopped",
        "flavor": {"vcpus": 1, "memoryMiB": 96},
        "boot": {"kernel": {"image": guest.KERNEL, "initrd": guest.INITRD, "cmdline": guest.CMDLINE}},
    },
}
VA: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "VolumeAttachment",
    "spec": {"instanceRef": {"name": "vm"}, "volume": {"name": "data", "sizeGiB": 1}},
}
MIG: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "Migration",
    "spec": {"instanceRef": {"name": "vm"}, "type": "Cold"},
}

#: Where a hostile value goes, per kind; each path gets generic values and its own tricks.
PATHS: dict[str, list[tuple[str, st.SearchStrategy[Any]]]] = {
    "VirtualInstance": [
        ("metadata.name", texts),
        ("spec.flavor.vcpus", ints),
        ("spec.flavor.memoryMiB", ints),
        ("spec.boot.kernel.image", texts),
        ("spec.boot.kernel.initrd", texts),
        ("spec.boot.kernel.cmdline", texts),
        ("spec.boot.image", st.builds(lambda n: {"name": n}, texts)),
        ("spec.userData", big_text),
        ("spec.networkConfig", big_text),
        ("spec.userData", texts),
        (
            "spec.injectedFiles",
            st.lists(st.fixed_dictionaries({"path": texts, "content": texts}), max_size=3),
        ),
        (
            "spec.adminPasswordSecretRef",
            st.one_of(cross_ref, st.fixed_dictionaries({"name": texts, "key": texts})),
        ),
        ("spec.nodeName", texts),
        ("spec.nodeSelector", st.dictionaries(texts, texts, max_size=2)),
        ("spec.interfaces", st.lists(st.fixed_dictionaries({"name": texts, "network": texts}), max_size=2)),
        ("spec.rootDisk.sizeGiB", ints),
        ("spec.swap.sizeMiB", ints),
        (
            "spec.ephemeralDisks",
            st.lists(st.fixed_dictionaries({"name": texts, "sizeGiB": ints}), max_size=2),
        ),
        ("spec.rescue", st.fixed_dictionaries({"enabled": st.booleans(), "image": texts})),
        (
            "spec.actions",
            st.fixed_dictionaries({"snapshot": st.fixed_dictionaries({"id": texts, "imageName": texts})}),
        ),
        ("spec.vnc", st.fixed_dictionaries({"enabled": st.booleans()})),
        ("spec.powerState", texts),
        ("spec.flavor", values),
        ("spec.boot", values),
    ],
    "VolumeAttachment": [
        ("metadata.name", texts),
        ("spec.instanceRef", st.one_of(cross_ref, values)),
        ("spec.volume.name", texts),
        ("spec.volume.sizeGiB", ints),
        ("spec.device", values),
        ("spec.image", st.builds(lambda n: {"name": n}, texts)),
        ("spec.readOnly", values),
    ],
    "Migration": [
        ("metadata.name", texts),
        ("spec.instanceRef", st.one_of(cross_ref, values)),
        ("spec.targetNode", texts),
        ("spec.flavor", values),
        ("spec.type", texts),
        ("spec.bandwidthMiBps", ints),
        ("spec.completionTimeoutPerGiB", ints),
        ("spec.decision", texts),
        ("spec.confirmation", values),
    ],
}
BASES = {"VirtualInstance": VI, "VolumeAttachment": VA, "Migration": MIG}
PLURALS = {
    "VirtualInstance": VIRTUALINSTANCES,
    "VolumeAttachment": VOLUMEATTACHMENTS,
    "Migration": MIGRATIONS,
}


def put(body: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = body
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            return  # an earlier mutation made a parent a scalar: that mutation stands alone
    node[leaf] = value


@st.composite
def hostile_objects(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(BASES)))
    body = copy.deepcopy(BASES[kind])
    body["metadata"] = {"name": f"x{draw(st.integers(0, 10**12))}"}
    for path, strategy in draw(st.lists(st.sampled_from(PATHS[kind]), min_size=1, max_size=3)):
        put(body, path, draw(strategy))
    return body


@pytest.fixture(scope="module")
def logs(ground: testground.Ground) -> dict[str, int]:
    """Where kubenova's logs end now: the tracebacks looked for are only the ones this module causes."""
    return {
        name: ground.layout.logfile(name).stat().st_size for name in ("controller", f"agent-{ground.node}")
    }


def new_log_lines(ground: testground.Ground, since: dict[str, int]) -> dict[str, str]:
    """What each of kubenova's processes logged after ``since`` (the logs fixture)."""
    found = {}
    for name, offset in since.items():
        with open(ground.layout.logfile(name), "rb") as log:
            log.seek(offset)
            found[name] = log.read().decode(errors="replace")
    return found


def test_hostile_input_is_refused_or_ends_in_a_clear_condition(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    namespace: str,
    logs: dict[str, int],
) -> None:
    accepted: list[dict[str, Any]] = []
    refused: list[str] = []
    # About 30 accepted instances take 30 of node-0's 32 schedulable vCPUs: instances earlier tests
    # still delete would leave the last ones Unschedulable until they are gone, and then placed.
    eventually(
        lambda: not custom.list_cluster_custom_object(GROUP, VERSION, VIRTUALINSTANCES)["items"],
        timeout=180,
        what="earlier tests' instances to be gone",
    )

    # Derandomized: every CI run tries the same 1000 objects, so a red run names a real regression.
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )
    @given(hostile_objects())
    def apply(body: dict[str, Any]) -> None:
        plural = PLURALS[body["kind"]]
        try:
            created = custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, body, field_validation="Strict"
            )
        except kubernetes.client.ApiException as exc:
            assert exc.status in (400, 409, 413, 422), (exc.status, exc.body[:500])
            if exc.status == 409:
                return  # the same name drawn twice
            message = str(exc.body)
            assert any(
                word in message
                for word in (
                    "spec",
                    "metadata",
                    "name",
                    "Unsupported value",
                    "unknown field",
                    "Request entity too large",
                    "limit",
                )
            ), message
            refused.append(message)
            return
        except ValueError as exc:  # the client cannot even serialise it (a float that is not JSON)
            refused.append(str(exc))
            return
        accepted.append(created)

    def check_answers(accepted: list[dict[str, Any]], refused: list[str]) -> None:
        REPORT.append(
            f"bad input: {len(refused) + len(accepted)} generated objects applied: {len(refused)} refused "
            f"at admission, {len(accepted)} accepted and answered in status"
        )
        assert len(refused) + len(accepted) >= EXAMPLES // 2

        def answered(obj: dict[str, Any]) -> dict[str, Any] | None:
            plural = PLURALS[obj["kind"]]
            try:
                fresh = custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, obj["metadata"]["name"]
                )
            except kubernetes.client.ApiException as exc:
                return None if exc.status != 404 else obj  # a Migration of a missing instance may be gone
            status = fresh.get("status") or {}
            if obj["kind"] == "Migration":
                return fresh if status.get("phase") and status.get("message") else None
            ready = next(
                (
                    c
                    for c in status.get("conditions") or []
                    if c["type"] in ("Ready", "Scheduled") and (c["status"] == "True" or c.get("message"))
                ),
                None,
            )
            return fresh if ready else None

        def fresh(obj: dict[str, Any]) -> dict[str, Any] | None:
            try:
                return dict(
                    custom.get_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURALS[obj["kind"]], obj["metadata"]["name"]
                    )
                )
            except kubernetes.client.ApiException as exc:
                if exc.status == 404:
                    return None
                raise

        settled = []
        for obj in accepted:
            settled.append(
                eventually(
                    lambda o=obj: answered(o),
                    timeout=180,
                    interval=0.5,
                    what=f"{obj['kind']} {obj['metadata']['name']} to say how it is ({obj['spec']})",
                )
            )
        # No retry storm: once settled (the first diagnostics written), nothing is rewritten while the
        # agent keeps retrying the failed ones with backoff.
        time.sleep(10)
        before = {o["metadata"]["uid"]: o for o in map(fresh, settled) if o}
        time.sleep(20)
        rewritten = [
            f"{o['kind']} {o['metadata']['name']}: {before[o['metadata']['uid']].get('status')} -> "
            f"{o.get('status')}"
            for o in map(fresh, settled)
            if o
            and o["metadata"]["resourceVersion"]
            != before[o["metadata"]["uid"]]["metadata"]["resourceVersion"]
        ]
        assert not rewritten, f"rewritten while nothing changed: {rewritten}"
        events = core.list_namespaced_event(namespace).items
        per_object: dict[str, int] = {}
        for event in events:
            per_object[event.involved_object.name] = per_object.get(event.involved_object.name, 0) + (
                event.count or 1
            )
        assert max(per_object.values(), default=0) <= 10, f"an Event storm: {sorted(per_object.items())[:5]}"

    apply()
    check_answers(accepted, refused)  # on a failure, the namespace fixture still deletes them all
    for obj in accepted:
        try:
            custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURALS[obj["kind"]], obj["metadata"]["name"]
            )
        except kubernetes.client.ApiException as exc:
            assert exc.status == 404
    for plural in PLURALS.values():
        eventually(
            lambda p=plural: not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, p)["items"],
            timeout=180,
            what=f"every accepted {plural} deleted (no finalizer stuck)",
        )
    # "No traceback in the logs" (docs/reliability.md): nothing failed inside a handler, from apply to delete.
    for name, text in new_log_lines(ground, logs).items():
        problems = log_problems(text)
        assert not problems, f"{name} logged {len(problems)} failures on the bad input: {problems[:5]}"
