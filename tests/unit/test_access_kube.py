"""The access server's calls through the official client, and its command line."""

from __future__ import annotations

import asyncio
from typing import Any

import kubernetes
import pytest

from kubenova.cli import parser
from kubenova.handlers.access.flags import host_port
from kubenova.handlers.access.frontproxy import User
from kubenova.handlers.access.kube import KubernetesCluster


def _cluster() -> KubernetesCluster:
    return KubernetesCluster(kubernetes.client.ApiClient(kubernetes.client.Configuration()))


def test_the_review_asks_about_the_user_groups_extra_and_the_subresource() -> None:
    cluster = _cluster()
    sent: list[Any] = []

    def create(body: Any) -> Any:
        sent.append(body)
        status = kubernetes.client.V1SubjectAccessReviewStatus(allowed=False, reason="no RoleBinding")
        return kubernetes.client.V1SubjectAccessReview(spec=body.spec, status=status)

    cluster.authz.create_subject_access_review = create  # type: ignore[method-assign]
    attributes = {
        "group": "subresources.compute.kubenova.io",
        "resource": "virtualinstances",
        "subresource": "vnc",
        "namespace": "team-a",
        "name": "web",
        "verb": "create",
    }
    user = User("alice", ("team-a",), {"scopes": ("a",)})
    decision = asyncio.run(cluster.review(user, attributes))
    assert (decision.allowed, decision.reason) == (False, "no RoleBinding")
    body = kubernetes.client.ApiClient().sanitize_for_serialization(sent[0])
    assert body["spec"] == {
        "user": "alice",
        "groups": ["team-a"],
        "extra": {"scopes": ["a"]},
        "resourceAttributes": attributes,
    }


def test_a_missing_instance_or_node_is_none_and_the_endpoint_comes_from_status_access() -> None:
    cluster = _cluster()

    def missing(*args: Any) -> Any:
        raise kubernetes.client.ApiException(status=404)

    cluster.custom.get_namespaced_custom_object = missing  # type: ignore[method-assign]
    cluster.custom.get_cluster_custom_object = missing  # type: ignore[method-assign]
    assert asyncio.run(cluster.instance("team-a", "web")) is None
    assert asyncio.run(cluster.endpoint("node-0")) is None
    nodes = {"node-0": {"status": {"access": {"endpoint": "10.0.0.5:8444"}}}, "node-1": {"status": {}}}
    cluster.custom.get_cluster_custom_object = lambda g, v, p, name: nodes[name]  # type: ignore[method-assign]
    assert asyncio.run(cluster.endpoint("node-0")) == "10.0.0.5:8444"
    assert asyncio.run(cluster.endpoint("node-1")) is None


def test_the_access_command_takes_its_flags_with_their_defaults() -> None:
    files = ["--tls-cert", "c", "--tls-key", "k", "--agent-client-cert", "ac", "--agent-client-key", "ak"]
    args = parser().parse_args(["access", *files, "--agent-ca", "ca"])
    assert (args.address, args.idle_timeout, args.auth_refresh) == ("0.0.0.0:8443", 1800.0, 60.0)
    assert (args.tls_cert, args.agent_ca) == ("c", "ca")
    assert host_port("[::]:8443") == ("::", 8443)
    with pytest.raises(ValueError):
        host_port("8443")
