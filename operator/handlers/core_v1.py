"""The few core/v1 calls kubenova makes for itself, as the apiserver's JSON, through the official client.

The client's ``CoreV1Api`` module loads its ~250 pydantic models the first time it is used: 20 MiB of an
agent's RSS (64.3 -> 84.1 MiB, measured), for an agent that only posts Events, reads and makes Secrets and
reads claims. These calls go through the same ``ApiClient`` (its configuration, credentials and TLS) and
raise the same ``ApiException``; bodies and answers are plain mappings in the API's own field names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kubernetes

_JSON = {"200": "object", "201": "object", "202": "object"}


class CoreV1:
    """Events, Secrets and PersistentVolumeClaims of the core API group, as mappings."""

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.api_client = client

    def _call(
        self, method: str, path: str, params: Mapping[str, str], body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = self.api_client.param_serialize(
            method,
            path,
            path_params=dict(params),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*request)
        response.read()
        found = self.api_client.response_deserialize(response, _JSON).data  # raises ApiException on an error
        return found if isinstance(found, dict) else {}

    def create_namespaced_event(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/api/v1/namespaces/{namespace}/events", {"namespace": namespace}, body)

    def read_namespaced_secret(self, name: str, namespace: str) -> dict[str, Any]:
        path = "/api/v1/namespaces/{namespace}/secrets/{name}"
        return self._call("GET", path, {"namespace": namespace, "name": name})

    def create_namespaced_secret(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/api/v1/namespaces/{namespace}/secrets", {"namespace": namespace}, body)

    def read_namespaced_persistent_volume_claim(self, name: str, namespace: str) -> dict[str, Any]:
        path = "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}"
        return self._call("GET", path, {"namespace": namespace, "name": name})
