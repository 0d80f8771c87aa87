"""The Secrets an instance names (admin password, user data) and the one the agent keeps for it (VNC).

Read by the reconciler before the spec is translated, so translation stays pure; a Secret that is
missing or unusable is ``WaitFor``: said in status and retried, never a failure of the spec.
"""

from __future__ import annotations

import base64
import secrets
import string
from collections.abc import Mapping
from typing import Any

import kubernetes

from kubenova.driver.base import Credentials
from kubenova.handlers.agent.translate import SecretValues, vnc_secret_name
from kubenova.handlers.core_v1 import CoreV1
from kubenova.handlers.shared import GROUP, VERSION


class WaitFor(Exception):
    """Something outside the spec is missing (a Secret); retried with backoff, said in status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def not_opted_in(namespace: str, field: str) -> WaitFor:
    """The agent reads Secrets only in namespaces that opted in (docs/security.md)."""
    return WaitFor(
        "SecretForbidden",
        f"{field}: kubenova's agent may not use Secrets in namespace {namespace}: a namespace opts in "
        "with a RoleBinding of the ClusterRole kubenova-agent-secrets to the ServiceAccount "
        "kubenova-agent (the chart's tenantNamespaces makes one)",
    )


class SecretReader:
    """Reads and makes Secrets through the core API it is given (a fake one in unit tests)."""

    def __init__(self, core: CoreV1) -> None:
        self.core = core

    def for_instance(self, instance: Mapping[str, Any]) -> SecretValues:
        """Every Secret value the instance's definition needs, in the order a first boot needs them."""
        namespace, spec = instance["metadata"]["namespace"], instance.get("spec") or {}
        return SecretValues(
            admin_password=self.value(
                namespace, spec.get("adminPasswordSecretRef"), "spec.adminPasswordSecretRef", "password"
            ),
            user_data=self.value(
                namespace, spec.get("userDataSecretRef"), "spec.userDataSecretRef", "userData"
            ),
            vnc_password=self.vnc_password(instance),
        )

    def value(
        self, namespace: str, ref: Mapping[str, Any] | None, field: str, default_key: str
    ) -> str | None:
        """A value from the Secret ``ref`` names (the field it came from, for messages); a missing one is
        waited for."""
        if not ref:
            return None
        key = ref.get("key", default_key)
        data = self._data(namespace, ref["name"], field).get(key)
        if data is None:
            raise WaitFor(
                "SecretMissing",
                f"{field}: Secret {ref['name']!r} has no key {key!r}; add it or set {field}.key",
            )
        try:
            return base64.b64decode(data).decode()
        except UnicodeDecodeError:
            raise WaitFor(
                "SecretInvalid", f"{field}: the key {key!r} of Secret {ref['name']!r} is not UTF-8 text"
            ) from None

    def image_credentials(self, instance: Mapping[str, Any]) -> Credentials | None:
        """What the boot image's import needs from ``spec.boot.image.secretRef``; None without one."""
        ref = (((instance.get("spec") or {}).get("boot") or {}).get("image") or {}).get("secretRef")
        return self.credentials(instance["metadata"]["namespace"], ref, "spec.boot.image.secretRef")

    def credentials(self, namespace: str, ref: Mapping[str, Any] | None, field: str) -> Credentials | None:
        """A registry's or a file server's credentials from the Secret ``ref`` names: username and password
        (or a ``.dockerconfigjson``) and a CA (``ca.crt``); None without a ref."""
        if not ref:
            return None
        data = {k: base64.b64decode(v) for k, v in self._data(namespace, ref["name"], field).items()}
        if not data.keys() & {"username", "password", "ca.crt", ".dockerconfigjson"}:
            raise WaitFor(
                "SecretInvalid",
                f"{field}: Secret {ref['name']!r} has none of username, password, .dockerconfigjson, ca.crt; "
                "add what the server asks for",
            )
        username, password = data.get("username"), data.get("password")
        return Credentials(
            username=username.decode() if username is not None else None,
            password=password.decode() if password is not None else None,
            ca_pem=data.get("ca.crt"),
            dockerconfigjson=data.get(".dockerconfigjson"),
        )

    def _data(self, namespace: str, name: str, field: str) -> dict[str, str]:
        """A Secret's data (base64 values); a missing one is waited for, a forbidden one said so."""
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                missing = f"{field}: Secret {name!r} does not exist in namespace {namespace}; create it"
                raise WaitFor("SecretMissing", missing) from exc
            if exc.status == 403:
                raise not_opted_in(namespace, field) from exc
            raise
        return {key: str(value) for key, value in (secret.get("data") or {}).items()}

    def vnc_password(self, body: Mapping[str, Any]) -> str | None:
        """The instance's VNC password, kept in the Secret <name>-vnc (made once, owned by the instance).

        Kept in a Secret rather than status, so that reading it takes the same RBAC as reading any
        Secret of the namespace, and so that a restarted agent or a migration target finds the same one.
        """
        meta = body["metadata"]
        if not ((body.get("spec") or {}).get("vnc") or {}).get("enabled"):
            return None
        name = vnc_secret_name(meta["name"])
        password = "".join(
            secrets.choice(string.ascii_letters + string.digits) for _ in range(8)
        )  # VNC's limit
        try:
            self.core.create_namespaced_secret(
                meta["namespace"],
                {
                    "metadata": {
                        "name": name,
                        "labels": {f"{GROUP}/vnc-for": meta["uid"]},  # a name may be too long for a label
                        "ownerReferences": [
                            {
                                "apiVersion": f"{GROUP}/{VERSION}",
                                "kind": "VirtualInstance",
                                "name": meta["name"],
                                "uid": meta["uid"],
                            }
                        ],
                    },
                    "stringData": {"password": password},
                },
            )
            return password
        except kubernetes.client.ApiException as exc:
            if exc.status == 403:
                raise not_opted_in(meta["namespace"], "spec.vnc") from exc
            if exc.status != 409:
                raise
        existing = self.core.read_namespaced_secret(name, meta["namespace"])
        data = (existing.get("data") or {}).get("password")
        if data is None:  # a Secret of that name that kubenova did not make
            raise WaitFor(
                "SecretConflict",
                f"spec.vnc: Secret {name!r} exists without a 'password' key, so it is "
                "not the one kubenova keeps the VNC password in; rename or delete it",
            )
        return base64.b64decode(data).decode()
