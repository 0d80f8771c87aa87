"""The verbs of `kubectl kubenova` that only talk to the apiserver: each writes what a user could write by
hand (a field of the instance's spec, a new action id, a Migration) and waits for kubenova's answer in
status."""

from __future__ import annotations

import argparse
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes

from kubenova.handlers.shared import EXPOSE_LABEL, GROUP, MIGRATIONS, VERSION, VIRTUALINSTANCES

#: verb -> (spec.powerState it asks for, powerStates it makes sense from)
POWER = {
    "start": ("Running", ("Stopped", "Crashed", "NoState")),
    "stop": ("Stopped", ("Running", "Paused", "Suspended", "Crashed", "Blocked")),
    "pause": ("Paused", ("Running",)),
    "unpause": ("Running", ("Paused",)),
    "suspend": ("Suspended", ("Running",)),
    "resume": ("Running", ("Suspended",)),
}
FINAL = ("Succeeded", "Failed", "Cancelled", "Reverted", "AwaitingConfirmation")
#: `expose` owns the fields it applies under this name (server-side apply).
FIELD_MANAGER = "kubectl-kubenova"
#: A Service's name: an RFC 1035 label.
SERVICE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


class Refused(Exception):
    """One line for the user; the plugin exits 1."""

    #: What the line starts with: the apiserver's own refusals are printed as kubectl prints them.
    prefix = "error: "


class Plugin:
    def __init__(
        self, namespace: str | None, timeout: float, kubeconfig: str | None = None, context: str | None = None
    ) -> None:
        # An own Configuration (not the client's global default): the streaming verbs build their
        # WebSocket from the very credentials, CA and proxy these API calls use.
        self.configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=self.configuration
            )
        except kubernetes.config.ConfigException:
            if kubeconfig or context:
                raise
            kubernetes.config.load_incluster_config(client_configuration=self.configuration)
        self.custom = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(self.configuration))
        self.core = kubernetes.client.CoreV1Api(self.custom.api_client)
        if namespace is None:
            namespace = _context_namespace(kubeconfig, context)
        self.namespace = namespace or "default"
        self.timeout = timeout

    # --- reading and waiting -------------------------------------------------------------

    def get(self, name: str, plural: str = VIRTUALINSTANCES) -> dict[str, Any]:
        try:
            return dict(
                self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                kind = "VirtualInstance" if plural == VIRTUALINSTANCES else "Migration"
                raise Refused(f"{kind} {name!r} not found in namespace {self.namespace}") from exc
            raise

    def wait(
        self, name: str, done: Callable[[dict[str, Any]], str | None], plural: str = VIRTUALINSTANCES
    ) -> str:
        """Poll until ``done`` returns a message; a timeout is a refusal naming what did not happen."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            message = done(self.get(name, plural))
            if message is not None:
                return message
            time.sleep(0.5)
        raise Refused(f"{name}: no answer from kubenova within {self.timeout:.0f}s; see kubectl describe")

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, VIRTUALINSTANCES, name, {"spec": spec}
        )

    # --- verbs ---------------------------------------------------------------------------

    def create(self, name: str, args: argparse.Namespace) -> str:
        """A VirtualInstance from flags: the same object `kubectl apply` of a manifest makes."""
        spec = _spec_from_flags(args)
        try:
            self.custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                VIRTUALINSTANCES,
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "VirtualInstance",
                    "metadata": {"name": name},
                    "spec": spec,
                },
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:
                raise Refused(
                    f"VirtualInstance {name!r} already exists in namespace {self.namespace}"
                ) from exc
            if exc.status == 422:  # the schema's own message names the field
                raise Refused(f"refused: {_message(exc)}") from exc
            raise
        want = spec["powerState"]

        def ready(obj: dict[str, Any]) -> str | None:
            status = obj.get("status") or {}
            ready_ = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
            if status.get("phase") == "Failed":
                raise Refused(f"{name} failed: {ready_.get('message', '')}")
            if status.get("powerState") == want and ready_.get("status") == "True":
                return f"{name} is {want} on {status.get('node')}"
            return None

        return self.wait(name, ready)

    def delete(self, name: str) -> str:
        self.get(name)
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, VIRTUALINSTANCES, name)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                self.get(name)
            except Refused:
                return f"{name} deleted"
            time.sleep(0.5)
        raise Refused(f"{name} is still being deleted after {self.timeout:.0f}s; see kubectl describe")

    def power(self, verb: str, name: str) -> str:
        want, valid_from = POWER[verb]
        body = self.get(name)
        state = (body.get("status") or {}).get("powerState", "NoState")
        if state not in valid_from:
            raise Refused(f"cannot {verb} {name}: it is {state}")
        self.patch_spec(name, {"powerState": want})

        def reached(obj: dict[str, Any]) -> str | None:
            status = obj.get("status") or {}
            if (
                status.get("powerState") == want
                and status.get("observedGeneration") == obj["metadata"]["generation"]
            ):
                return f"{name} is {want}"
            return None

        return self.wait(name, reached)

    def action(self, name: str, kind: str, request: dict[str, Any]) -> str:
        self.get(name)
        request = {"id": f"kubectl-{uuid.uuid4().hex[:8]}", **request}
        self.patch_spec(name, {"actions": {kind: request}})

        def acknowledged(obj: dict[str, Any]) -> str | None:
            ack = ((obj.get("status") or {}).get("actions") or {}).get(kind) or {}
            if ack.get("id") != request["id"] or ack.get("phase") not in ("Succeeded", "Failed"):
                return None
            if ack["phase"] == "Failed":
                raise Refused(f"{kind} of {name} failed: {ack.get('message', '')}")
            return f"{name}: {ack.get('message', kind + ' done')}"

        return self.wait(name, acknowledged)

    def rescue(self, name: str, image: str | None, enabled: bool) -> str:
        body = self.get(name)
        rescued = (body.get("status") or {}).get("phase") == "Rescued"
        if enabled == rescued:
            raise Refused(f"{name} is {'already' if rescued else 'not'} in rescue")
        current = (body.get("spec") or {}).get("rescue") or {}
        image = image or current.get("image")
        if enabled and not image:
            raise Refused("rescue needs --image: a rescue image in the node's image store")
        self.patch_spec(name, {"rescue": {"enabled": enabled, **({"image": image} if image else {})}})
        want = "Rescued" if enabled else "Running"
        return self.wait(
            name,
            lambda o: (
                f"{name} is {want}"
                if (o.get("status") or {}).get("phase") == want
                and o["status"].get("observedGeneration") == o["metadata"]["generation"]
                else None
            ),
        )

    def migrate(self, name: str, live: bool, target: str | None, wait: bool) -> str:
        self.get(name)
        spec: dict[str, Any] = {"instanceRef": {"name": name}, "type": "Live" if live else "Cold"}
        if target:
            spec["targetNode"] = target
        made = self.custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            MIGRATIONS,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "Migration",
                "metadata": {"generateName": f"{name[:50]}-"},
                "spec": spec,
            },
        )
        migration = made["metadata"]["name"]
        if not wait:
            return f"migration {migration} created"

        def ended(obj: dict[str, Any]) -> str | None:
            status = obj.get("status") or {}
            if status.get("phase") not in FINAL:
                return None
            if status["phase"] in ("Failed", "Cancelled"):
                raise Refused(f"migration {migration} {status['phase']}: {status.get('message', '')}")
            return f"migration {migration} {status['phase']}: {status.get('message', '')}"

        return self.wait(migration, ended, MIGRATIONS)

    def expose(self, name: str, args: argparse.Namespace) -> str:
        """Create or update (server-side apply) a Service in front of the instance: kubenova's controller
        fills its endpoints from the instances it selects, once they have a leased address."""
        instance = self.get(name)
        service = service_for(instance, args)
        service_name = service["metadata"]["name"]
        try:
            self.core.patch_namespaced_service(
                service_name,
                self.namespace,
                service,
                field_manager=FIELD_MANAGER,
                _content_type="application/apply-patch+yaml",
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:
                raise Refused(
                    f"Service {service_name!r} exists and another manager owns fields expose would set "
                    f"({_message(exc)}); change it with kubectl, or pass --name for another Service"
                ) from exc
            if exc.status == 422:
                raise Refused(f"refused: {_message(exc)}") from exc
            raise
        spec = service["spec"]
        port = spec["ports"][0]
        selector = ",".join(f"{key}={value}" for key, value in sorted(spec["selector"].items()))
        said = (
            f"service/{service_name} ({spec['type']}) port {port['port']}/{port['protocol']} -> "
            f"{port['targetPort']} of the VirtualInstances with {selector}"
        )
        labels = instance["metadata"].get("labels") or {}
        if any(labels.get(key) != value for key, value in spec["selector"].items()):
            said += (
                f"\nnote: {name} is not among them until it has these labels: kubectl label vi {name} "
                + (" ".join(f"{key}={value}" for key, value in sorted(spec["selector"].items())))
            )
        return said

    def diag(self, name: str) -> str:
        status = self.get(name).get("status") or {}
        diagnostics, info = status.get("diagnostics") or {}, status.get("info") or {}
        if not diagnostics and not info:
            raise Refused(f"{name} has no diagnostics yet (the agent reads them while it runs)")
        rows = [
            ("node", status.get("node", "")),
            ("power state", status.get("powerState", "")),
            ("vCPUs", info.get("vcpus", "")),
            ("memory (KiB)", info.get("maxMemKiB", "")),
            ("CPU time (ns)", info.get("cpuTimeNs", "")),
            ("read at", diagnostics.get("updateTime", "")),
        ]
        lines = [f"{key:<16}{value}" for key, value in rows]
        for disk in diagnostics.get("disks") or []:
            lines.append(
                f"disk {disk['name']:<11}read {disk.get('rdBytes', 0)} B in {disk.get('rdReq', 0)}, "
                f"wrote {disk.get('wrBytes', 0)} B in {disk.get('wrReq', 0)}, errors {disk.get('errs', 0)}"
            )
        for nic in diagnostics.get("interfaces") or []:
            lines.append(
                f"nic {nic['name']:<12}rx {nic.get('rxBytes', 0)} B / {nic.get('rxPackets', 0)} pkts, "
                f"tx {nic.get('txBytes', 0)} B / {nic.get('txPackets', 0)} pkts"
            )
        return "\n".join(lines)


def _context_namespace(kubeconfig: str | None, context: str | None) -> str | None:
    """The namespace the chosen (or current) kubeconfig context names, as kubectl's -n defaults to it."""
    try:
        contexts, current = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
        chosen = next((c for c in contexts if c["name"] == context), None) if context else current
        return str(chosen["context"].get("namespace") or "") or None
    except (kubernetes.config.ConfigException, KeyError, TypeError):
        return None


def _message(exc: kubernetes.client.ApiException) -> str:
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(exc.reason)


def _spec_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The spec `create`'s flags describe; flags that contradict each other are refused before any call."""
    if bool(args.image) == bool(args.kernel):
        raise Refused("create needs either --image or --kernel (with --initrd and --cmdline)")
    boot = (
        {"image": {"name": args.image}}
        if args.image
        else {
            "kernel": {
                "image": args.kernel,
                "cmdline": args.cmdline,
                **({"initrd": args.initrd} if args.initrd else {}),
            }
        }
    )
    spec: dict[str, Any] = {
        "flavor": {"vcpus": args.vcpus, "memoryMiB": args.memory},
        "boot": boot,
        "powerState": "Stopped" if args.stopped else "Running",
    }
    if args.vnc:
        spec["vnc"] = {"enabled": True}
    if args.node_selector:
        pairs = [item.split("=", 1) for item in args.node_selector]
        if any(len(pair) != 2 for pair in pairs):
            raise Refused("--node-selector takes key=value")
        spec["nodeSelector"] = dict(pairs)
    return spec


def own_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels a user chose: kubenova's own (its binding, a migration's target) change as it places
    and moves the instance, so a selector on them would lose the instance."""
    return {key: value for key, value in labels.items() if not key.split("/")[0].endswith("kubenova.io")}


def service_for(instance: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The Service `expose` applies: the opt-in label, a selector, one port. kubenova writes no user
    object's metadata (GitOps sees no drift), so it cannot label the instance for the Service: the
    selector is the instance's own labels (all of them, never kubenova's) or --selector."""
    meta = instance["metadata"]
    name = args.service_name or meta["name"]
    if not SERVICE_NAME.fullmatch(name):
        raise Refused(
            f"{name!r} is no Service name (lowercase letters, digits and '-', starting with a letter, "
            "at most 63 characters); pass --name"
        )
    labels = own_labels(meta.get("labels") or {})
    if args.selector:
        pairs = [item.split("=", 1) for item in args.selector]
        if any(len(pair) != 2 or not pair[0] for pair in pairs):
            raise Refused("--selector takes key=value")
        selector = dict(pairs)
    elif labels:
        selector = labels
    else:
        raise Refused(
            f"{meta['name']} has no labels for a Service to select it by: label it "
            f"(kubectl label vi {meta['name']} app={meta['name']}) or pass --selector key=value"
        )
    for flag, value in (("--port", args.port), ("--target-port", args.target_port)):
        if value is not None and not 1 <= value <= 65535:
            raise Refused(f"{flag} takes a port number from 1 to 65535")
    if args.node_port is not None and args.type != "NodePort":
        raise Refused("--node-port needs --type NodePort")
    port: dict[str, Any] = {
        "port": args.port,
        "targetPort": args.target_port or args.port,
        "protocol": args.protocol,
    }
    if args.node_port is not None:
        port["nodePort"] = args.node_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": {EXPOSE_LABEL: "true"}},
        "spec": {"type": args.type, "selector": selector, "ports": [port]},
    }
