"""What the server asks the kube-apiserver: one small interface, so unit tests can answer in memory.

The real one uses the official client (blocking) through ``asyncio.to_thread``, as the rest of kubenova
does, and reads each object from the apiserver on each request: a stream is opened seldom, and a cache
would let a just-stopped or just-moved instance be reached at its old node.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import kubernetes

from kubenova.handlers.access.frontproxy import AuthConfig, User, parse_auth_config
from kubenova.handlers.shared import COMPUTENODES, GROUP, VERSION, VIRTUALINSTANCES, typed

#: Where the kube-apiserver publishes its front proxy's settings for aggregated API servers.
AUTH_NAMESPACE = "kube-system"
AUTH_CONFIGMAP = "extension-apiserver-authentication"


@dataclasses.dataclass(frozen=True)
class Decision:
    """A SubjectAccessReview's answer."""

    allowed: bool
    reason: str = ""


class Cluster(Protocol):
    """The four reads and writes the server needs of the kube-apiserver."""

    async def instance(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The VirtualInstance ``namespace/name``, None when there is none."""
        ...

    async def endpoint(self, node: str) -> str | None:
        """``host:port`` of the agent's access server from the ComputeNode, None when it publishes none."""
        ...

    async def review(self, user: User, attributes: Mapping[str, str]) -> Decision:
        """May ``user`` do what ``attributes`` (a SubjectAccessReview's resourceAttributes) say?"""
        ...

    async def auth_config(self) -> AuthConfig:
        """The front proxy's settings."""
        ...


class KubernetesCluster:
    """``Cluster`` through the official client."""

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)
        self.authz = kubernetes.client.AuthorizationV1Api(client)

    async def instance(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        try:
            read = self.custom.get_namespaced_custom_object
            return typed(await asyncio.to_thread(read, GROUP, VERSION, namespace, VIRTUALINSTANCES, name))
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def endpoint(self, node: str) -> str | None:
        try:
            body = typed(
                await asyncio.to_thread(
                    self.custom.get_cluster_custom_object, GROUP, VERSION, COMPUTENODES, node
                )
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        found = ((body.get("status") or {}).get("access") or {}).get("endpoint")
        return str(found) if found else None

    async def review(self, user: User, attributes: Mapping[str, str]) -> Decision:
        models = kubernetes.client
        body = models.V1SubjectAccessReview(
            api_version="authorization.k8s.io/v1",
            kind="SubjectAccessReview",
            spec=models.V1SubjectAccessReviewSpec(
                user=user.name,
                groups=list(user.groups),
                extra={key: list(values) for key, values in user.extra.items()},
                resource_attributes=models.V1ResourceAttributes(
                    group=attributes["group"],
                    resource=attributes["resource"],
                    subresource=attributes["subresource"],
                    namespace=attributes["namespace"],
                    name=attributes["name"],
                    verb=attributes["verb"],
                ),
            ),
        )
        answer = await asyncio.to_thread(self.authz.create_subject_access_review, body)
        status = answer.status
        return Decision(bool(status and status.allowed), str((status and status.reason) or ""))

    async def auth_config(self) -> AuthConfig:
        answer = await asyncio.to_thread(self.core.read_namespaced_config_map, AUTH_CONFIGMAP, AUTH_NAMESPACE)
        return parse_auth_config(answer.data or {})
