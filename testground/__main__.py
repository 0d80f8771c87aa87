"""The embedded test ground, from a source checkout: `.venv/bin/python -m testground
up|down|status|env|images|demo`.

etcd, kube-apiserver, libvirtd and kubenova itself (or, with `up --cluster`, a real node running
kubenova's image from its helm chart). Not part of the installed `kubenova` distribution.
"""

from __future__ import annotations

import argparse
import logging
import sys

from testground import ground, kube, served
from testground.procs import Layout, TestGroundError


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m testground",
        description="the embedded test ground: etcd, kube-apiserver, libvirtd, kubenova",
    )
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = top.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start everything (idempotent) and print how to use it")
    up.add_argument("--no-kubenova", action="store_true", help="start only etcd, kube-apiserver and libvirtd")
    up.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="compute nodes, each a libvirtd in its own network namespace with its own agent; "
        "instances migrate between them [1]",
    )
    up.add_argument(
        "--cluster",
        action="store_true",
        help="a real single-node cluster instead of local processes: containerd, kubelet, scheduler, "
        "controller manager and kube-proxy run kubenova's image, installed with its helm chart",
    )
    sub.add_parser("down", help="stop everything the test ground started, even after a crash")
    sub.add_parser("status", help="show what is running")
    sub.add_parser("env", help="print the shell exports for kubectl")
    sub.add_parser("images", help="what the test ground serves for spec.boot.image: url, checksum, registry")
    sub.add_parser("demo", help="start everything, boot the sample VM and show it Running, timed")
    return top


def run(action: str, start_kubenova: bool = True, nodes: int = 1, cluster: bool = False) -> int:
    if action == "up":
        started = ground.up(start_kubenova, nodes=nodes, cluster=cluster)
        for name, state in ground.status(started.layout).items():
            print(f"{name:24} {state}")
        print(
            f"\nlogs: {started.layout.state / 'logs'}\nTo use kubectl:\n"
            f"{ground.exports(started.layout, started.tools)}"
        )
    elif action == "down":
        stopped = ground.down()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    elif action == "status":
        for name, state in ground.status().items() or {"test ground": "not started"}.items():
            print(f"{name:24} {state}")
    elif action == "images":
        print(served.describe(served.info(Layout.default())))
    elif action == "env":
        print(ground.exports(Layout.default(), kube.build_tools()))
    elif action == "demo":
        ground.demo(ground.up())
    else:
        raise TestGroundError(f"unknown action {action!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run(
            args.action,
            start_kubenova=not getattr(args, "no_kubenova", False),
            nodes=getattr(args, "nodes", 1),
            cluster=getattr(args, "cluster", False),
        )
    except TestGroundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
