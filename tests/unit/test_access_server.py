"""Every refusal before a stream: RBAC's answer, the request's own namespace, the instance's state, and a
node's agent that is not who the node says."""

from __future__ import annotations

import asyncio

from tests.unit.access_harness import (
    FakeCluster,
    access_server,
    auth_config,
    fake_agent,
    instance,
    refused,
    stream_path,
)
from tests.unit.access_pki import Pki, pki  # noqa: F401 (the fixture)


def _cluster(pki: Pki, **instances: dict[str, object]) -> FakeCluster:  # noqa: F811
    cluster = FakeCluster(auth_config(pki))
    cluster.instances = {
        ("team-a", name): body for name, body in (instances or {"web": instance("web")}).items()
    }
    for sub in ("console", "vnc", "portforward"):
        cluster.allowed.add(("alice", "team-a", sub))
    return cluster


def test_a_denied_review_is_a_403_status_in_the_apiservers_words(pki: Pki) -> None:  # noqa: F811
    async def scenario() -> None:
        cluster = _cluster(pki)
        cluster.allowed.discard(("alice", "team-a", "console"))
        async with access_server(pki, cluster) as served:
            status, body = await refused(served, stream_path("web", "console"))
        assert status == 403
        assert body == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "reason": "Forbidden",
            "code": 403,
            "message": 'virtualinstances.subresources.compute.kubenova.io "web" is forbidden: User "alice" '
            'cannot create resource "virtualinstances/console" in API group '
            '"subresources.compute.kubenova.io" in the namespace "team-a"',
            "details": {
                "name": "web",
                "group": "subresources.compute.kubenova.io",
                "kind": "virtualinstances",
            },
        }
        [(user, attributes)] = cluster.reviews
        assert (user.name, user.groups) == ("alice", ("team-a",))
        assert attributes == {
            "group": "subresources.compute.kubenova.io",
            "resource": "virtualinstances",
            "subresource": "console",
            "namespace": "team-a",
            "name": "web",
            "verb": "create",
        }
        assert cluster.lookups == [], "a denied user learns nothing of the instance"

    asyncio.run(scenario())


def test_an_instance_is_looked_up_only_in_the_requests_namespace(pki: Pki) -> None:  # noqa: F811
    async def scenario() -> None:
        cluster = _cluster(pki)
        cluster.instances = {("team-b", "web"): instance("web")}
        async with access_server(pki, cluster) as served:
            status, body = await refused(served, stream_path("web", "vnc", namespace="team-a"))
        assert (status, body["reason"], body["message"]) == (
            404,
            "NotFound",
            'virtualinstances "web" not found',
        )
        assert cluster.lookups == [("team-a", "web")]

    asyncio.run(scenario())


def test_bad_requests_are_400_before_anyone_is_asked(pki: Pki) -> None:  # noqa: F811
    async def scenario() -> None:
        cluster = _cluster(pki)
        async with access_server(pki, cluster) as served:
            for port in ("", "0", "65536", "ssh", "-1"):
                status, body = await refused(served, stream_path("web", "portforward") + f"?port={port}")
                assert (status, body["reason"]) == (400, "BadRequest"), port
                assert "1 to 65535" in body["message"]
            status, body = await refused(served, stream_path("web", "exec"))
            assert status == 400 and "console, vnc, portforward" in body["message"]
            async with served.session(pki.front_proxy) as http:
                async with http.get(served.url + stream_path(), headers={"X-Remote-User": "alice"}) as answer:
                    assert answer.status == 400 and "WebSocket" in (await answer.json())["message"]
                async with http.get(served.url + "/apis/nothing/here") as answer:
                    assert answer.status == 404 and (await answer.json())["kind"] == "Status"
        assert cluster.reviews == []

    asyncio.run(scenario())


def test_a_stopped_instance_is_409_naming_the_fix_but_its_console_log_is_read(pki: Pki) -> None:  # noqa: F811
    async def scenario() -> None:
        cluster = _cluster(pki, web=instance("web", phase="Stopped"), new=instance("new", node="", phase=""))
        async with fake_agent(pki, pki.node0) as agent:
            cluster.endpoints["node-0"] = agent.endpoint
            async with access_server(pki, cluster) as served:
                status, body = await refused(served, stream_path("web", "console"))
                assert (status, body["reason"]) == (409, "Conflict")
                assert "phase Stopped" in body["message"] and "kubectl kubenova start web" in body["message"]
                status, body = await refused(served, stream_path("new", "console") + "?log=true")
                assert status == 409 and "not bound to a node" in body["message"]
                agent.refuse = (418, "only to see the log request reached the agent")
                status, body = await refused(served, stream_path("web", "console") + "?log=true")
                assert status == 502
            assert agent.streams == [("/v1/instances/uid-web/console", {"log": "true"}, "kubenova-access")]

    asyncio.run(scenario())


def test_a_node_without_an_endpoint_or_unreachable_is_503(pki: Pki) -> None:  # noqa: F811
    async def scenario() -> None:
        cluster = _cluster(pki)
        async with access_server(pki, cluster) as served:
            status, body = await refused(served, stream_path())
            assert (status, body["reason"]) == (503, "ServiceUnavailable")
            assert 'node "node-0" publishes no access endpoint' in body["message"]
            cluster.endpoints["node-0"] = "127.0.0.1:9"  # discard: nobody listens
            status, body = await refused(served, stream_path())
            assert status == 503 and "cannot be reached" in body["message"]
            cluster.endpoints["node-0"] = "no-port-here"
            status, body = await refused(served, stream_path())
            assert status == 503 and "no host:port" in body["message"]

    asyncio.run(scenario())


def test_an_agent_with_another_nodes_certificate_is_never_relayed(pki: Pki) -> None:  # noqa: F811
    """node-1 publishes its own address as node-0's (or node-0's endpoint leads to node-1): the TLS
    handshake checks the certificate against the name node-0 and ends before any request is sent."""

    async def scenario() -> None:
        cluster = _cluster(pki)
        async with fake_agent(pki, pki.node1) as impostor, access_server(pki, cluster) as served:
            cluster.endpoints["node-0"] = impostor.endpoint
            status, body = await refused(served, stream_path())
            assert status == 503 and 'node "node-0"' in body["message"]
            assert impostor.streams == []

    asyncio.run(scenario())


def test_an_agent_refusal_is_502_with_its_status_and_message(pki: Pki) -> None:  # noqa: F811
    async def scenario() -> None:
        cluster = _cluster(pki)
        async with fake_agent(pki, pki.node0) as agent, access_server(pki, cluster) as served:
            cluster.endpoints["node-0"] = agent.endpoint
            agent.refuse = (409, "instance uid-web does not run on node-0")
            status, body = await refused(served, stream_path("web", "vnc"))
        assert (status, body["code"]) == (502, 502)
        assert body["message"] == (
            'the agent of node "node-0" refused the vnc: 409: instance uid-web does not run on node-0'
        )

    asyncio.run(scenario())
