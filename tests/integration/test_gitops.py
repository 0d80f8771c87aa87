"""kubenova never writes spec, and a lifecycle costs few API writes (counted by the real apiserver)."""

from __future__ import annotations

import collections
import re
from typing import Any

import kubernetes

from kubenova.handlers.shared import GROUP, VERSION, VIRTUALINSTANCES, VOLUMEATTACHMENTS
from testground import ground as testground
from tests.helpers import eventually
from tests.integration.test_agent import attach, delete_and_wait, patch_spec, wait_action, wait_ready
from tests.integration.test_virtualinstance import get, make

WRITES = ("POST", "PUT", "PATCH", "DELETE", "APPLY")
_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$")


def writes(api_client: kubernetes.client.ApiClient) -> collections.Counter[tuple[str, str, str]]:
    """apiserver_request_total for writes to VirtualInstances and Events, by (verb, resource, subresource)."""
    text = api_client.rest_client.request("GET", f"{api_client.configuration.host}/metrics").read().decode()
    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("verb") in WRITES and labels.get("resource") in (VIRTUALINSTANCES, "events"):
            counts[labels["verb"], labels["resource"], labels.get("subresource", "")] += int(
                float(match["value"])
            )
    return counts


def delta(before: collections.Counter[Any], after: collections.Counter[Any]) -> dict[Any, int]:
    return {key: after[key] - before[key] for key in after if after[key] != before[key]}


def test_create_and_delete_cost_few_writes(
    ground: testground.Ground,
    api_client: kubernetes.client.ApiClient,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    namespace: str,
) -> None:
    start = writes(api_client)
    uid = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, make("cheap"))[
        "metadata"
    ]["uid"]
    wait_ready(custom, namespace, "cheap")
    eventually(
        lambda: [
            e
            for e in core.list_namespaced_event(namespace, field_selector=f"involvedObject.uid={uid}").items
            if e.reason == "Running" and e.type == "Normal"
        ],
        timeout=10,
        what="a Running Event",
    )
    created = delta(start, writes(api_client))
    ours = sum(created.values()) - created.pop(("POST", VIRTUALINSTANCES, ""))  # the user's create
    print(f"create -> Running: kubenova wrote {ours} times: {created}")
    assert ours <= 3, created

    start = writes(api_client)
    delete_and_wait(custom, namespace, "cheap")
    deleted = delta(start, writes(api_client))
    ours = sum(deleted.values()) - deleted.pop(("DELETE", VIRTUALINSTANCES, ""))  # the user's delete
    print(f"delete: kubenova wrote {ours} times: {deleted}")
    assert ours <= 3, deleted


def test_kubenova_never_writes_spec(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    user_changes = 0
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, make("gitops"))
    wait_ready(custom, namespace, "gitops")
    for power in ("Stopped", "Running"):
        patch_spec(custom, namespace, "gitops", {"powerState": power})
        user_changes += 1
        wait_ready(custom, namespace, "gitops", power)
    patch_spec(custom, namespace, "gitops", {"actions": {"reboot": {"id": "g1", "type": "Hard"}}})
    user_changes += 1
    wait_action(custom, namespace, "gitops", "reboot", "g1")
    attach(custom, namespace, "d", "gitops", volume={"name": f"gitops-{namespace}", "sizeGiB": 1})
    va = eventually(
        lambda: (
            (v := custom.get_namespaced_custom_object(GROUP, VERSION, namespace, VOLUMEATTACHMENTS, "d"))
            .get("status", {})
            .get("phase")
            == "Attached"
            and v
        ),
        timeout=120,
        what="Attached",
    )

    obj = get(custom, namespace, "gitops")
    assert obj["metadata"]["generation"] == 1 + user_changes, (
        "only the user's spec changes moved the generation"
    )
    assert va["metadata"]["generation"] == 1
    for body in (obj, va):
        owners = {
            entry["manager"]
            for entry in body["metadata"]["managedFields"]
            if "f:spec" in (entry.get("fieldsV1") or {})
        }
        managers = {entry["manager"] for entry in body["metadata"]["managedFields"]}
        assert {"kubenova-agent", "kubenova-controller"} <= managers, managers
        assert not any(owner.startswith("kubenova") for owner in owners), owners
    delete_and_wait(custom, namespace, "d", VOLUMEATTACHMENTS)
    delete_and_wait(custom, namespace, "gitops")
    (ground.volume_store() / namespace / f"gitops-{namespace}").unlink()
