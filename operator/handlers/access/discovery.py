"""What anyone may read: the group's discovery documents, the OpenAPI documents and the health checks.

The kube-apiserver reads discovery and OpenAPI from every APIService it aggregates (with its own
front-proxy identity, but kubectl's discovery reaches them through it as the user too); a failing
answer marks the APIService unavailable, so these never need a user.
"""

from __future__ import annotations

from aiohttp import web

from kubenova.handlers.access.status import SUBRESOURCE_GROUP, SUBRESOURCE_VERSION
from kubenova.handlers.shared import VIRTUALINSTANCES

#: The streams a VirtualInstance has here; each is also a path segment.
SUBRESOURCES = ("console", "vnc", "portforward")

GROUP_VERSION = f"{SUBRESOURCE_GROUP}/{SUBRESOURCE_VERSION}"
_VERSION_ENTRY = {"groupVersion": GROUP_VERSION, "version": SUBRESOURCE_VERSION}
_GROUP = {
    "kind": "APIGroup",
    "apiVersion": "v1",
    "name": SUBRESOURCE_GROUP,
    "versions": [_VERSION_ENTRY],
    "preferredVersion": _VERSION_ENTRY,
}


def resource_list() -> dict[str, object]:
    """The v1alpha1 APIResourceList: the subresources, and their parent with no verbs at all.

    The parent is listed so that clients map ``virtualinstances.subresources.compute.kubenova.io`` to this
    group: without it `kubectl auth can-i create virtualinstances.subresources.compute.kubenova.io
    --subresource=console` finds no such resource and asks about another group, answering no for everyone.
    It serves nothing (no verbs; every other path answers 404), and the VirtualInstances themselves stay
    ``compute.kubenova.io``'s: the APIService's lower group priority keeps the bare name theirs.
    """
    parent = {
        "name": VIRTUALINSTANCES,
        "singularName": "virtualinstance",
        "namespaced": True,
        "kind": "VirtualInstance",
        "verbs": [],
    }
    subresources = [
        {
            "name": f"{VIRTUALINSTANCES}/{sub}",
            "singularName": "",
            "namespaced": True,
            "kind": "VirtualInstance",
            "verbs": ["get", "create"],
        }
        for sub in SUBRESOURCES
    ]
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": GROUP_VERSION,
        "resources": [parent, *subresources],
    }


async def apis(request: web.Request) -> web.Response:
    return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": [_GROUP]})


async def group(request: web.Request) -> web.Response:
    return web.json_response(_GROUP)


async def version(request: web.Request) -> web.Response:
    return web.json_response(resource_list())


async def openapi_v2(request: web.Request) -> web.Response:
    """A valid, empty Swagger 2.0 document: the streams have no schema for kubectl to check."""
    return web.json_response(
        {
            "swagger": "2.0",
            "info": {"title": "kubenova subresources", "version": SUBRESOURCE_VERSION},
            "paths": {},
            "definitions": {},
        }
    )


async def openapi_v3(request: web.Request) -> web.Response:
    return web.json_response({"paths": {}})


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/apis", apis)
    app.router.add_get(f"/apis/{SUBRESOURCE_GROUP}", group)
    app.router.add_get(f"/apis/{GROUP_VERSION}", version)
    app.router.add_get("/openapi/v2", openapi_v2)
    app.router.add_get("/openapi/v3", openapi_v3)
    for path in ("/healthz", "/readyz", "/livez"):
        app.router.add_get(path, healthy)
