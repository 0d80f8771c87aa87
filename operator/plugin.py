"""`kubectl kubenova`: day-to-day verbs for VirtualInstances.

Each verb writes only what a user could write by hand (a field of the instance's spec, a new
action id, a Migration) and then waits for kubenova's answer in status, so the plugin never
holds state of its own and a GitOps user can do the same with YAML. Problems are one line on
stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import base64
import json
import pathlib
import socket
import socketserver
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import kubernetes

from kubenova.handlers.shared import GROUP, MIGRATIONS, VERSION, VIRTUALINSTANCES

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


class Refused(Exception):
    """One line for the user; the plugin exits 1."""


class Plugin:
    def __init__(self, namespace: str | None, timeout: float) -> None:
        try:
            kubernetes.config.load_kube_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_incluster_config()
        self.custom = kubernetes.client.CustomObjectsApi()
        if namespace is None:
            try:
                namespace = kubernetes.config.list_kube_config_contexts()[1]["context"].get("namespace")
            except (kubernetes.config.ConfigException, KeyError, TypeError):
                namespace = None
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

    def vnc(self, name: str, port: int, ready: Callable[[str], None]) -> None:
        """Forward a local port to the guest's VNC server and say the password; runs until interrupted.

        The VNC server listens on the loopback of the instance's node, so this runs on that node
        (or through an SSH tunnel to it), as `console` does; nothing listens on other interfaces.
        """
        body = self.get(name)
        vnc = (body.get("status") or {}).get("vnc") or {}
        if not ((body.get("spec") or {}).get("vnc") or {}).get("enabled"):
            raise Refused(f"{name} has no VNC server: create it with spec.vnc.enabled true")
        if not vnc.get("port"):
            raise Refused(f"{name} has no VNC endpoint yet (is it running?)")
        core = kubernetes.client.CoreV1Api(self.custom.api_client)
        secret_name = vnc["passwordSecretRef"]["name"]
        try:
            secret = core.read_namespaced_secret(secret_name, self.namespace)
        except kubernetes.client.ApiException as exc:
            raise Refused(
                f"cannot read the Secret {secret_name} with the VNC password: {exc.reason}"
            ) from exc
        password = base64.b64decode((secret.data or {}).get("password", "")).decode()
        server = socketserver.ThreadingTCPServer(("127.0.0.1", port), _forwarder(vnc["host"], vnc["port"]))
        server.daemon_threads = True
        ready(f"vnc://127.0.0.1:{server.server_address[1]} password {password} (Ctrl-C to stop)")
        try:
            server.serve_forever()
        finally:
            server.server_close()

    def console(self, name: str, instances_dir: pathlib.Path, follow: bool) -> None:
        """Print the serial console log; it is a file on the instance's node, so this runs there."""
        status = self.get(name).get("status") or {}
        log = (status.get("console") or {}).get("logFile")
        if not log:
            raise Refused(f"{name} has no console yet")
        path = instances_dir / log
        if not path.is_file():
            raise Refused(
                f"{path} is not here: run this on node {status.get('node')} or pass --instances-dir"
            )
        with path.open(errors="replace") as handle:
            while True:
                chunk = handle.read()
                if chunk:
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
                elif not follow:
                    return
                else:
                    time.sleep(0.5)


def _forwarder(host: str, port: int) -> type[socketserver.BaseRequestHandler]:
    class Forward(socketserver.BaseRequestHandler):
        """One VNC client: bytes both ways until either side closes."""

        def handle(self) -> None:
            with socket.create_connection((host, port), timeout=10) as upstream:
                upstream.settimeout(None)
                pump = threading.Thread(target=_copy, args=(upstream, self.request), daemon=True)
                pump.start()
                _copy(self.request, upstream)
                pump.join()

    return Forward


def _copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _message(exc: kubernetes.client.ApiException) -> str:
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(exc.reason)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kubectl kubenova", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top.add_argument(
        "-n", "--namespace", help="the instance's namespace [the kubeconfig context's, or default]"
    )
    top.add_argument("--timeout", type=float, default=300, help="seconds to wait for kubenova's answer [300]")
    verbs = top.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", help="create a VirtualInstance and wait until it runs")
    create.add_argument("name")
    create.add_argument("--vcpus", type=int, default=1, help="virtual CPUs [1]")
    create.add_argument("--memory", type=int, default=256, help="memory in MiB [256]")
    create.add_argument("--image", help="boot this disk image from the node's image store")
    create.add_argument("--kernel", help="or boot this kernel from the node's image store")
    create.add_argument("--initrd", help="with this initramfs")
    create.add_argument("--cmdline", default="console=ttyS0", help="with this command line [console=ttyS0]")
    create.add_argument(
        "--node-selector",
        action="append",
        metavar="KEY=VALUE",
        help="only nodes with this label (repeatable)",
    )
    create.add_argument("--stopped", action="store_true", help="create it powered off")
    create.add_argument(
        "--vnc", action="store_true", help="with a VNC server (password in the Secret <name>-vnc)"
    )
    verbs.add_parser("delete", help="delete a VirtualInstance and wait until it is gone").add_argument("name")
    helps = {
        "start": "power on (spec.powerState Running)",
        "stop": "power off (spec.powerState Stopped)",
        "pause": "pause the vCPUs (Paused)",
        "unpause": "run a paused instance again",
        "suspend": "save the guest's memory and stop (Suspended)",
        "resume": "restore a suspended instance",
    }
    for verb, text in helps.items():
        verbs.add_parser(verb, help=text, description=text).add_argument("name")
    reboot = verbs.add_parser("reboot", help="reboot once (spec.actions.reboot with a new id)")
    reboot.add_argument("name")
    reboot.add_argument("--hard", action="store_true", help="reset instead of asking the guest (ACPI)")
    rescue = verbs.add_parser("rescue", help="boot a rescue image with the root disk attached")
    rescue.add_argument("name")
    rescue.add_argument("--image", help="rescue image in the node's image store [the spec's]")
    verbs.add_parser("unrescue", help="boot normally again").add_argument("name")
    snapshot = verbs.add_parser("snapshot", help="save the root disk as an image in the node's image store")
    snapshot.add_argument("name")
    snapshot.add_argument("image", help="file name of the new image")
    migrate = verbs.add_parser("migrate", help="move the instance to another node (a Migration object)")
    migrate.add_argument("name")
    migrate.add_argument("--live", action="store_true", help="keep it running (Live); default Cold")
    migrate.add_argument("--to", dest="target", help="the target ComputeNode [the controller chooses]")
    migrate.add_argument("--no-wait", action="store_true", help="return once the Migration exists")
    verbs.add_parser("diag", help="diagnostics as a table").add_argument("name")
    vnc = verbs.add_parser(
        "vnc", help="forward a local port to the guest's VNC server (on the instance's node)"
    )
    vnc.add_argument("name")
    vnc.add_argument("--port", type=int, default=0, help="local port on 127.0.0.1 [any free one]")
    console = verbs.add_parser("console", help="print the serial console log (on the instance's node)")
    console.add_argument("name")
    console.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    console.add_argument(
        "--instances-dir",
        type=pathlib.Path,
        default=pathlib.Path("/var/lib/kubenova/instances"),
        help="the agent's --instances-dir on this node [/var/lib/kubenova/instances]",
    )
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        plugin = Plugin(args.namespace, args.timeout)
        if args.verb == "create":
            print(plugin.create(args.name, args))
        elif args.verb == "delete":
            print(plugin.delete(args.name))
        elif args.verb in POWER:
            print(plugin.power(args.verb, args.name))
        elif args.verb == "reboot":
            print(plugin.action(args.name, "reboot", {"type": "Hard" if args.hard else "Soft"}))
        elif args.verb in ("rescue", "unrescue"):
            print(plugin.rescue(args.name, getattr(args, "image", None), args.verb == "rescue"))
        elif args.verb == "snapshot":
            print(plugin.action(args.name, "snapshot", {"imageName": args.image}))
        elif args.verb == "migrate":
            print(plugin.migrate(args.name, args.live, args.target, not args.no_wait))
        elif args.verb == "diag":
            print(plugin.diag(args.name))
        elif args.verb == "vnc":
            plugin.vnc(args.name, args.port, lambda line: print(line, flush=True))
        else:
            plugin.console(args.name, args.instances_dir, args.follow)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except kubernetes.config.ConfigException as exc:
        print(f"error: no cluster to talk to: {exc}", file=sys.stderr)
        return 1
    except kubernetes.client.ApiException as exc:
        print(f"error: the apiserver said {exc.status} {exc.reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
