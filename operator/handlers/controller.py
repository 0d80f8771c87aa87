"""The controller: cluster-wide decisions (placement); never calls libvirt.

It uses only event handlers and in-memory indexes, so it adds no finalizers and no
bookkeeping annotations to users' objects.
"""
from __future__ import annotations

import logging
from typing import Any

import kopf
import kubernetes

from kubenova.handlers import virtualinstance
from kubenova.handlers.common import COMPUTENODES, GROUP, NODE_LABEL, VERSION, VIRTUALINSTANCES
from kubenova.handlers.placement import NodeView, Usage

VI = (GROUP, VERSION, VIRTUALINSTANCES)
CN = (GROUP, VERSION, COMPUTENODES)


def _usage(index: kopf.Index[str, Usage]) -> dict[str, Usage]:
    totals: dict[str, Usage] = {}
    for node, usages in index.items():
        for usage in usages:
            totals[node] = totals.get(node, Usage()) + usage
    return totals


def _nodes(index: kopf.Index[str, NodeView]) -> dict[str, NodeView]:
    return {name: next(iter(views)) for name, views in index.items()}


def run() -> None:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING

    @kopf.index(*CN, registry=registry, id="node_views")
    def node_views(name: str, labels: kopf.Labels, spec: kopf.Spec, status: kopf.Status,
                   **_: Any) -> dict[str, NodeView]:
        return {name: virtualinstance.node_view(name, labels, spec, status)}  # type: ignore[arg-type]

    @kopf.index(*VI, registry=registry, id="node_usage")
    def node_usage(labels: kopf.Labels, spec: kopf.Spec, **_: Any) -> dict[str, Usage] | None:
        node = labels.get(NODE_LABEL)
        return {node: virtualinstance.request_of(spec)} if node else None

    @kopf.index(*VI, registry=registry, id="unbound", labels={NODE_LABEL: kopf.ABSENT})
    def unbound(body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {"pending": dict(body)}

    api = kubernetes.client.CustomObjectsApi

    @kopf.on.event(*VI, registry=registry, labels={NODE_LABEL: kopf.ABSENT})
    def place_instance(body: kopf.Body, type: str | None, node_views: kopf.Index[str, NodeView],
                       node_usage: kopf.Index[str, Usage], **_: Any) -> None:
        if type == "DELETED" or body["metadata"].get("deletionTimestamp"):
            return
        virtualinstance.place(api(), body, _nodes(node_views), _usage(node_usage))

    @kopf.on.event(*CN, registry=registry)
    def retry_pending(type: str | None, node_views: kopf.Index[str, NodeView], node_usage: kopf.Index[str, Usage],
                      unbound: kopf.Index[str, Any], **_: Any) -> None:
        """A node appeared or changed: instances waiting for capacity get another chance."""
        if type == "DELETED":
            return
        nodes, used = _nodes(node_views), _usage(node_usage)
        for body in list(unbound.get("pending", [])):
            if body["metadata"].get("deletionTimestamp"):
                continue
            node = virtualinstance.place(api(), body, nodes, used)
            if node:  # the index learns of it later; count it now so one pass does not overfill a node
                used[node] = used.get(node, Usage()) + virtualinstance.request_of(body.get("spec") or {})

    kubernetes.config.load_config()
    kopf.run(registry=registry, clusterwide=True, standalone=True)
