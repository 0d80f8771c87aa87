"""`kubectl kubenova`: day-to-day verbs for VirtualInstances.

Each verb writes only what a user could write by hand (a field of the instance's spec, a new
action id, a Migration) and then waits for kubenova's answer in status, so the plugin never
holds state of its own and a GitOps user can do the same with YAML. Problems are one line on
stderr and a non-zero exit.

console, vnc, port-forward and ssh reach into the VM through the kube-apiserver (the subresources
virtualinstances/console, /vnc and /portforward), so they work from any machine with a kubeconfig:
  kubectl kubenova console web            # interactive serial console; escape with Ctrl-]
  kubectl kubenova console web --log      # the persistent boot log
  kubectl kubenova vnc desk               # a local VNC port, and a viewer when one is installed
  kubectl kubenova port-forward web 8080:80 2222:22
  kubectl kubenova ssh web -l debian
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import kubernetes

from kubenova.plugin import access, node, stream
from kubenova.plugin.verbs import POWER, Plugin, Refused


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kubectl kubenova", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top.add_argument(
        "-n", "--namespace", help="the instance's namespace [the kubeconfig context's, or default]"
    )
    top.add_argument("--timeout", type=float, default=300, help="seconds to wait for kubenova's answer [300]")
    top.add_argument("--kubeconfig", help="the kubeconfig file [$KUBECONFIG, or ~/.kube/config]")
    top.add_argument("--context", help="the kubeconfig context [its current-context]")
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
    snapshot = verbs.add_parser(
        "snapshot", help="save the root disk as an image among the namespace's own snapshots on the node"
    )
    snapshot.add_argument("name")
    snapshot.add_argument("image", help="file name of the new image")
    migrate = verbs.add_parser("migrate", help="move the instance to another node (a Migration object)")
    migrate.add_argument("name")
    migrate.add_argument("--live", action="store_true", help="keep it running (Live); default Cold")
    migrate.add_argument("--to", dest="target", help="the target ComputeNode [the controller chooses]")
    migrate.add_argument("--no-wait", action="store_true", help="return once the Migration exists")
    expose = verbs.add_parser(
        "expose",
        help="put a Service in front of the instance (kubenova keeps its endpoints)",
        description="Create or update (server-side apply) a Service labelled compute.kubenova.io/expose=true "
        "whose selector is the instance's own labels (or --selector): kubenova's controller points it at "
        "the instances it selects once they have an address on their node's default network.",
    )
    expose.add_argument("name")
    expose.add_argument("--port", type=int, required=True, help="the Service's port")
    expose.add_argument("--target-port", type=int, help="the port the guest listens on [--port]")
    expose.add_argument("--name", dest="service_name", help="the Service's name [the instance's]")
    expose.add_argument("--type", choices=("ClusterIP", "NodePort"), default="ClusterIP", help="[ClusterIP]")
    expose.add_argument("--node-port", type=int, help="with --type NodePort: this node port [any free one]")
    expose.add_argument("--protocol", choices=("TCP", "UDP"), default="TCP", help="[TCP]")
    expose.add_argument(
        "--selector",
        action="append",
        metavar="KEY=VALUE",
        help="select on these labels (repeatable) [all the instance's own labels]",
    )
    verbs.add_parser("diag", help="diagnostics as a table").add_argument("name")
    _access_verbs(verbs)
    return top


def _access_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """console, vnc, port-forward and ssh: through the apiserver, with an on-node fallback for the first two
    (a node's shell without a kubeconfig that may use the subresources)."""
    console = verbs.add_parser(
        "console",
        help="the serial console through the apiserver (interactive; --log: the boot log)",
        description="Attach to the guest's serial console through the kube-apiserver: keys go to the guest "
        "(the terminal is in raw mode), its output comes back; Ctrl-] ends the session. One console per "
        "instance: a newer one takes over. Piped stdin is sent as it is.",
    )
    console.add_argument("name")
    console.add_argument("--log", action="store_true", help="print the persistent boot log and exit")
    console.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="with --log: then attach; with --instances-dir: keep reading",
    )
    console.add_argument(
        "--instances-dir",
        type=pathlib.Path,
        help="on the instance's node: read the log file in the agent's --instances-dir instead",
    )
    vnc = verbs.add_parser(
        "vnc",
        help="a local port to the guest's VNC server through the apiserver, and a viewer",
        description="Listen on 127.0.0.1:PORT; each connection reaches the guest's VNC server through the "
        "kube-apiserver. Launches --viewer, or remote-viewer or vncviewer when installed; the forward ends "
        "when the viewer exits.",
    )
    vnc.add_argument("name")
    vnc.add_argument("--port", type=int, default=0, help="local port on 127.0.0.1 [any free one]")
    vnc.add_argument(
        "--viewer", help="viewer command; {host} {port} {url} filled in, else the vnc:// URL added"
    )
    vnc.add_argument("--no-viewer", action="store_true", help="only forward; connect your own viewer")
    vnc.add_argument(
        "--on-node", action="store_true", help="on the instance's node: forward to its loopback VNC port"
    )
    forward = verbs.add_parser(
        "port-forward",
        help="forward local ports to the guest's TCP ports through the apiserver",
        description="Like kubectl port-forward, to the guest's own address: LOCAL:REMOTE, REMOTE (the same "
        "local port) or :REMOTE (any free local port), on 127.0.0.1, until Ctrl-C.",
    )
    forward.add_argument("name")
    forward.add_argument("ports", nargs="+", metavar="LOCAL:REMOTE")
    ssh = verbs.add_parser(
        "ssh",
        usage="kubectl kubenova ssh [-h] [-l USER] [-p PORT] [-c COMMAND] name [-- SSH-ARGS ...]",
        help="ssh into the guest through port-forward",
        description="Run ssh against a port-forward to the guest's SSH port; the host key is kept under "
        "NAME.NAMESPACE (HostKeyAlias). Arguments after -- go to ssh before the destination.",
    )
    ssh.add_argument("name")
    ssh.add_argument("-l", "--user", help="login name [ssh's default]")
    ssh.add_argument("-p", "--port", type=int, default=22, help="the guest's SSH port [22]")
    ssh.add_argument("-c", "--command", help="run this command instead of a login shell")


def _access(plugin: Plugin, args: argparse.Namespace) -> int:
    """The streaming verbs; the on-node fallbacks keep their old behaviour."""
    endpoint = stream.Endpoint(plugin.configuration, plugin.namespace, args.name)
    if args.verb == "console" and args.instances_dir is not None:
        node.console(plugin, args.name, args.instances_dir, args.follow)
    elif args.verb == "console":
        access.console(endpoint, args.log, args.follow, sys.stdin, sys.stdout.buffer, sys.stderr)
    elif args.verb == "vnc" and args.on_node:
        node.vnc(plugin, args.name, args.port, _say)
    elif args.verb == "vnc":
        password = access.vnc_password(plugin, args.name)
        command = functools.partial(access.viewer_command, args.viewer, args.no_viewer)
        access.vnc(endpoint, args.port, command, password, _say)
    elif args.verb == "port-forward":
        access.port_forward(endpoint, args.ports, _say)
    else:
        return access.ssh(endpoint, args.user, args.port, args.extra, args.command)
    return 0


def _say(line: str) -> None:
    """What a forward is doing, on stdout as kubectl port-forward says it; errors go to stderr."""
    print(line, flush=True)


ACCESS = ("console", "vnc", "port-forward", "ssh")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments; what follows `--` is ssh's own (argparse would take it as kubenova's)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    top = parser()
    args = top.parse_args(argv[: len(argv) - len(extra) - 1] if "--" in argv else argv)
    if extra and args.verb != "ssh":
        top.error(f"only ssh takes arguments after --, not {args.verb}")
    args.extra = extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        plugin = Plugin(args.namespace, args.timeout, args.kubeconfig, args.context)
        if args.verb in ACCESS:
            return _access(plugin, args)
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
        elif args.verb == "expose":
            print(plugin.expose(args.name, args))
        else:
            print(plugin.diag(args.name))
    except Refused as exc:
        print(f"{exc.prefix}{exc}", file=sys.stderr)
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
