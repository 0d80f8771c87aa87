"""Who the access server believes: the kube-apiserver's front proxy, and nobody else."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from multidict import CIMultiDict

from kubenova.handlers.access.frontproxy import AuthConfig, parse_auth_config, user_from_headers
from tests.unit.access_harness import (
    GROUP_PATH,
    PROXY_HEADERS,
    FakeCluster,
    access_server,
    auth_config,
    instance,
)
from tests.unit.access_pki import Pki, pki  # noqa: F401 (the fixture)

CONSOLE = f"{GROUP_PATH}/namespaces/team-a/virtualinstances/web/console"


def test_the_configmap_is_read_as_the_kube_apiserver_writes_it() -> None:
    data = {
        "requestheader-client-ca-file": "-----BEGIN CERTIFICATE-----\n...",
        "requestheader-allowed-names": '["front-proxy-client"]',
        "requestheader-username-headers": '["X-Remote-User"]',
        "requestheader-group-headers": '["X-Remote-Group"]',
        "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]',
    }
    config = parse_auth_config(data)
    assert config == AuthConfig(
        data["requestheader-client-ca-file"],
        ("front-proxy-client",),
        ("X-Remote-User",),
        ("X-Remote-Group",),
        ("X-Remote-Extra-",),
    )
    assert parse_auth_config({"requestheader-allowed-names": "not json"}).allowed_names == ()


def test_user_groups_and_extra_come_from_the_named_headers() -> None:
    settings = AuthConfig("ca", (), ("X-Remote-User",), ("X-Remote-Group",), ("X-Remote-Extra-",))
    headers = CIMultiDict(
        [
            ("X-Remote-User", "alice"),
            ("X-Remote-Group", "team-a"),
            ("X-Remote-Group", "system:authenticated"),
            ("X-Remote-Extra-Scopes", "a"),
            ("X-Remote-Extra-Scopes", "b"),
            ("X-Remote-Extra-Acme.com%2Fproject", "p1"),
            ("X-Other-User", "mallory"),
        ]
    )
    user = user_from_headers(settings, headers)
    assert user is not None
    assert (user.name, user.groups) == ("alice", ("team-a", "system:authenticated"))
    assert user.extra == {"scopes": ("a", "b"), "acme.com/project": ("p1",)}
    assert user_from_headers(settings, CIMultiDict([("X-Remote-Group", "g")])) is None


def test_discovery_openapi_and_health_answer_anyone(pki: Pki) -> None:  # noqa: F811
    async def scenario() -> None:
        async with access_server(pki, FakeCluster(auth_config(pki))) as served, served.session() as http:
            for path in ("/healthz", "/readyz", "/livez", "/openapi/v3"):
                async with http.get(served.url + path) as answer:
                    assert answer.status == 200, path
            async with http.get(served.url + "/apis") as answer:
                groups = (await answer.json())["groups"]
                assert groups[0]["name"] == "subresources.compute.kubenova.io"
                assert groups[0]["preferredVersion"]["version"] == "v1alpha1"
            async with http.get(served.url + GROUP_PATH) as answer:
                found = await answer.json()
                assert found["kind"] == "APIResourceList"
                names = {r["name"]: r for r in found["resources"]}
                streams = {f"virtualinstances/{s}" for s in ("console", "vnc", "portforward")}
                assert set(names) == {"virtualinstances", *streams}
                assert all(names[n]["namespaced"] and names[n]["verbs"] == ["get", "create"] for n in streams)
                assert names["virtualinstances"]["verbs"] == [], "the parent is only named, for can-i"
            async with http.get(served.url + "/openapi/v2") as answer:
                assert (await answer.json())["swagger"] == "2.0"

    asyncio.run(scenario())


async def _stream_status(served_url: str, http: aiohttp.ClientSession) -> int:
    try:
        async with http.ws_connect(served_url + CONSOLE, headers=PROXY_HEADERS):
            return 101
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status


def _cluster(pki: Pki) -> FakeCluster:  # noqa: F811
    cluster = FakeCluster(auth_config(pki), instances={("team-a", "web"): instance("web")})
    cluster.allowed.add(("alice", "team-a", "console"))
    return cluster


async def _get(served_url: str, http: aiohttp.ClientSession) -> tuple[int, dict[str, object]]:
    async with http.get(served_url + CONSOLE, headers=PROXY_HEADERS) as answer:
        return answer.status, json.loads(await answer.text())


def test_forged_headers_without_a_client_certificate_get_401(pki: Pki) -> None:  # noqa: F811
    async def scenario() -> None:
        cluster = _cluster(pki)
        async with access_server(pki, cluster) as served, served.session() as http:
            status, body = await _get(served.url, http)
            assert (status, body["kind"], body["reason"], body["code"]) == (
                401,
                "Status",
                "Unauthorized",
                401,
            )
            assert await _stream_status(served.url, http) == 401
        assert cluster.reviews == [] and cluster.lookups == []

    asyncio.run(scenario())


def test_a_certificate_of_another_ca_with_forged_headers_is_refused(pki: Pki) -> None:  # noqa: F811
    """Python's TLS cannot ask for a certificate without verifying one that is sent: the handshake ends,
    a stronger refusal than the 401 the kube-apiserver would give; never a stream."""

    async def scenario() -> None:
        cluster = _cluster(pki)
        async with access_server(pki, cluster) as served, served.session(pki.rogue_front_proxy) as http:
            try:
                status, _ = await _get(served.url, http)
            except aiohttp.ClientError:
                status = 0
            assert status in (0, 401)
        assert cluster.reviews == [] and cluster.lookups == []

    asyncio.run(scenario())


def test_a_front_proxy_certificate_with_a_name_not_allowed_gets_401(pki: Pki) -> None:  # noqa: F811
    async def scenario() -> None:
        cluster = _cluster(pki)
        async with access_server(pki, cluster) as served, served.session(pki.front_proxy_other_cn) as http:
            status, body = await _get(served.url, http)
            assert (status, body["reason"]) == (401, "Unauthorized")
        assert cluster.reviews == []

    asyncio.run(scenario())


def test_empty_allowed_names_take_any_name_the_ca_signed(pki: Pki) -> None:  # noqa: F811
    async def scenario() -> None:
        cluster = _cluster(pki)
        cluster.config = auth_config(pki, allowed=())
        async with access_server(pki, cluster) as served, served.session(pki.front_proxy_other_cn) as http:
            status, body = await _get(served.url, http)
            assert status == 400 and "WebSocket" in str(body["message"])  # authenticated: past the 401

    asyncio.run(scenario())


def test_a_rotated_ca_is_followed_and_the_old_one_is_trusted_no_more(pki: Pki) -> None:  # noqa: F811
    async def scenario() -> None:
        cluster = _cluster(pki)
        async with access_server(pki, cluster) as served:
            async with served.session(pki.front_proxy) as http:
                assert (await _get(served.url, http))[0] == 400  # a plain GET: authenticated, no upgrade
            cluster.config = AuthConfig(
                pki.rogue_ca.pem(), ("front-proxy-client",), ("X-Remote-User",), (), ()
            )
            await served.front_proxy.refresh()
            async with served.session(pki.rogue_front_proxy) as http:
                assert (await _get(served.url, http))[0] == 400
            async with served.session(pki.front_proxy) as http:
                with pytest.raises(aiohttp.ClientError):
                    await _get(served.url, http)

    asyncio.run(scenario())
