"""`kubectl kubenova expose`: the Service it applies (the opt-in label, a selector on the instance's own
labels, one port), what it refuses before any call, and what it says."""

from __future__ import annotations

import json
from typing import Any

import kubernetes
import pytest

from kubenova.handlers.shared import EXPOSE_LABEL, MIGRATION_TARGET_LABEL, NODE_LABEL
from kubenova.plugin import cli
from kubenova.plugin.verbs import FIELD_MANAGER, Plugin, Refused, service_for


def args(*argv: str) -> Any:
    return cli.parser().parse_args(["expose", *argv])


def vi(name: str = "web", **labels: str) -> dict[str, Any]:
    bound = {NODE_LABEL: "node-0", MIGRATION_TARGET_LABEL: "node-1"}  # kubenova's, never selected on
    return {"metadata": {"name": name, "labels": {**bound, **labels}}}


def test_the_service_selects_the_instances_own_labels_and_opts_in() -> None:
    service = service_for(vi(app="web", tier="front"), args("web", "--port", "80"))
    assert service == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "labels": {EXPOSE_LABEL: "true"}},
        "spec": {
            "type": "ClusterIP",
            "selector": {"app": "web", "tier": "front"},
            "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}],
        },
    }


def test_every_flag_reaches_the_service() -> None:
    service = service_for(
        vi(app="web"),
        args(
            "web",
            *("--port", "53", "--target-port", "5353", "--name", "dns", "--protocol", "UDP"),
            *("--type", "NodePort", "--node-port", "30053", "--selector", "role=dns", "--selector", "x=y"),
        ),
    )
    assert service["metadata"]["name"] == "dns"
    assert service["spec"] == {
        "type": "NodePort",
        "selector": {"role": "dns", "x": "y"},
        "ports": [{"port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30053}],
    }


@pytest.mark.parametrize(
    ("instance", "argv", "said"),
    [
        (vi(), ("web", "--port", "80"), "kubectl label vi web app=web"),
        (vi(), ("web", "--port", "80"), "--selector key=value"),
        (vi(app="x"), ("web", "--port", "80", "--selector", "novalue"), "--selector takes key=value"),
        (vi(app="x"), ("web", "--port", "0"), "--port takes a port number"),
        (vi(app="x"), ("web", "--port", "80", "--target-port", "70000"), "--target-port takes"),
        (vi(app="x"), ("web", "--port", "80", "--node-port", "30080"), "--node-port needs --type NodePort"),
        (vi("web.example", app="x"), ("web.example", "--port", "80"), "pass --name"),
        (vi(app="x"), ("web", "--port", "80", "--name", "9lives"), "no Service name"),
    ],
)
def test_what_cannot_work_is_refused_before_any_call(
    instance: dict[str, Any], argv: tuple[str, ...], said: str
) -> None:
    with pytest.raises(Refused, match=said.replace(".", r"\.")):
        service_for(instance, args(*argv))


class FakeCustom:
    def __init__(self, instance: dict[str, Any] | None) -> None:
        self.instance = instance

    def get_namespaced_custom_object(self, *_: Any) -> dict[str, Any]:
        if self.instance is None:
            raise kubernetes.client.ApiException(status=404, reason="Not Found")
        return self.instance


class FakeCore:
    def __init__(self, answer: kubernetes.client.ApiException | None = None) -> None:
        self.applied: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
        self.answer = answer

    def patch_namespaced_service(self, name: str, namespace: str, body: Any, **options: Any) -> None:
        if self.answer is not None:
            raise self.answer
        self.applied.append((name, namespace, body, options))


def plugin(instance: dict[str, Any] | None, core: FakeCore) -> Plugin:
    made = Plugin.__new__(Plugin)  # no kubeconfig: the apiserver is the fakes
    made.namespace, made.timeout = "team-a", 1.0
    made.custom, made.core = FakeCustom(instance), core  # type: ignore[assignment]
    return made


def test_expose_applies_the_service_server_side_and_names_it() -> None:
    core = FakeCore()
    said = plugin(vi(app="web"), core).expose("web", args("web", "--port", "80", "--target-port", "8080"))
    ((name, namespace, body, options),) = core.applied
    assert (name, namespace, body["spec"]["selector"]) == ("web", "team-a", {"app": "web"})
    assert options == {"field_manager": FIELD_MANAGER, "_content_type": "application/apply-patch+yaml"}
    assert said.splitlines() == [
        "service/web (ClusterIP) port 80/TCP -> 8080 of the VirtualInstances with app=web"
    ]


def test_a_selector_the_instance_does_not_match_yet_says_how_to_label_it() -> None:
    said = plugin(vi(), FakeCore()).expose("web", args("web", "--port", "80", "--selector", "app=web"))
    assert (
        said.splitlines()[1]
        == "note: web is not among them until it has these labels: kubectl label vi web app=web"
    )


def test_what_the_apiserver_refuses_is_one_line() -> None:
    conflict = kubernetes.client.ApiException(status=409, reason="Conflict")
    conflict.body = json.dumps(
        {"message": 'Apply failed with 1 conflict: conflict with "kubectl": .spec.type'}
    )
    with pytest.raises(Refused, match="another manager owns fields.*spec.type.*--name"):
        plugin(vi(app="web"), FakeCore(conflict)).expose("web", args("web", "--port", "80"))
    invalid = kubernetes.client.ApiException(status=422, reason="Invalid")
    invalid.body = json.dumps(
        {"message": "spec.ports[0].nodePort: Invalid value: 80: provided port is not in range"}
    )
    with pytest.raises(Refused, match="refused: spec.ports"):
        plugin(vi(app="web"), FakeCore(invalid)).expose("web", args("web", "--port", "80"))
    with pytest.raises(Refused, match="VirtualInstance 'web' not found in namespace team-a"):
        plugin(None, FakeCore()).expose("web", args("web", "--port", "80"))
