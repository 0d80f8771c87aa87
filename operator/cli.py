"""The `kubenova` command: the controller, the node agent and the access server (console, VNC, port-forward).

The embedded test ground is not part of it: from a source checkout it runs as `python -m testground`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import pathlib
import sys
import urllib.error
import urllib.request

from kubenova.handlers import memory
from kubenova.handlers.agent import access_settings, network_flags


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kubenova", description=__doc__)
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    top.add_argument(
        "--version", action="version", version=f"kubenova {importlib.metadata.version('kubenova')}"
    )
    sub = top.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="exit 0 when URL answers 200 (the pods' liveness probes)")
    probe.add_argument("url")

    from kubenova.handlers.access.flags import add_parser as add_access

    add_access(sub)
    controller = sub.add_parser(
        "controller", help="run the cluster controller (placement; never calls libvirt)"
    )
    controller.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "kubenova-system"),
        help="namespace of the leader-election Lease [$POD_NAMESPACE, kubenova-system]",
    )
    controller.add_argument(
        "--health-address",
        default="",
        help="host:port of /healthz, which answers while the process runs; empty: none "
        "(the chart uses 127.0.0.1:8081)",
    )
    controller.add_argument(
        "--max-migrations-per-node",
        type=int,
        default=2,
        help="migrations a node takes part in at once, as source or target [2]",
    )
    controller.add_argument(
        "--max-migrations", type=int, default=10, help="migrations running at once in the whole cluster [10]"
    )
    controller.add_argument(
        "--watch-nodes",
        action="store_true",
        help="read the cluster's Nodes (cluster mode): a Node deleted or tainted "
        "node.kubernetes.io/out-of-service fences the ComputeNode whose agent ran there",
    )

    controller.add_argument(
        "--holder-image",
        default=os.environ.get("KUBENOVA_HOLDER_IMAGE", ""),
        help="the image of the pods that hold a claim on a VM's node (a pause image); empty: no claim "
        "attachments [$KUBENOVA_HOLDER_IMAGE]",
    )

    agent = sub.add_parser("agent", help="run the node agent (one per node)")
    agent.add_argument("--node", default=os.environ.get("NODE_NAME"), help="this node's name [$NODE_NAME]")
    agent.add_argument(
        "--libvirt-uri",
        default=os.environ.get("LIBVIRT_URI", "qemu:///system"),
        help="libvirt connection URI [$LIBVIRT_URI, qemu:///system]",
    )
    agent.add_argument(
        "--domain-type",
        default=os.environ.get("KUBENOVA_DOMAIN_TYPE", "kvm"),
        choices=["kvm", "qemu"],
        help="kvm, or qemu for software emulation (TCG) [$KUBENOVA_DOMAIN_TYPE, kvm]",
    )
    agent.add_argument(
        "--image-store",
        default=os.environ.get("KUBENOVA_IMAGE_STORE", "/var/lib/kubenova/images"),
        help="folder of boot images a spec may name [$KUBENOVA_IMAGE_STORE]",
    )
    agent.add_argument(
        "--instances-dir",
        default=os.environ.get("KUBENOVA_INSTANCES_DIR", "/var/lib/kubenova/instances"),
        help="folder of the instances' own files: disks, config drives, console logs "
        "[$KUBENOVA_INSTANCES_DIR]",
    )
    agent.add_argument(
        "--volume-store",
        default=os.environ.get("KUBENOVA_VOLUME_STORE", "/var/lib/kubenova/volumes"),
        help="folder of volumes a VolumeAttachment may name [$KUBENOVA_VOLUME_STORE]",
    )
    agent.add_argument(
        "--driver",
        default="libvirt",
        choices=["libvirt", "fake"],
        help="libvirt, or fake: an in-memory hypervisor for tests and scale benchmarks",
    )
    agent.add_argument(
        "--host-ip",
        default=os.environ.get("HOST_IP"),
        help="the address other nodes reach this one on [$HOST_IP, the host name's address]",
    )
    agent.add_argument(
        "--migration-uri",
        default=os.environ.get("KUBENOVA_MIGRATION_URI"),
        help="libvirt URI other nodes' libvirtd use to migrate instances here "
        "[$KUBENOVA_MIGRATION_URI, qemu+tls://<host-ip>/system]",
    )
    agent.add_argument(
        "--migration-pki-dir",
        default=os.environ.get("KUBENOVA_MIGRATION_PKI_DIR"),
        help="folder of this agent's libvirt client certificates (cacert.pem, clientcert.pem, clientkey.pem) "
        "for fetching a cold migration's disks over qemu+tls [$KUBENOVA_MIGRATION_PKI_DIR, libvirt's "
        "defaults: /etc/pki/CA, /etc/pki/libvirt]",
    )
    agent.add_argument(
        "--insecure-migration",
        action="store_true",
        default=os.environ.get("KUBENOVA_INSECURE_MIGRATION") == "true",
        help="test setups only: migrate to and from plain qemu+tcp peers, QEMU's stream without TLS "
        "[$KUBENOVA_INSECURE_MIGRATION=true]",
    )
    agent.add_argument(
        "--migration-completion-timeout-per-gib",
        type=float,
        default=150.0,
        help="a live transfer's deadline, in seconds per GiB of guest memory (at least 10 s); a Migration's "
        "spec.completionTimeoutPerGiB overrides it [150]",
    )
    agent.add_argument(
        "--lease-duration",
        type=int,
        default=40,
        help="seconds of the heartbeat Lease, renewed every quarter of it; once it expires the controller "
        "marks the node and its instances Ready=Unknown [40]",
    )
    agent.add_argument(
        "--kubernetes-node",
        default="",
        help="the Kubernetes Node the agent runs on (cluster mode: the chart passes spec.nodeName); deleting "
        "that Node or tainting it node.kubernetes.io/out-of-service fences this node",
    )
    agent.add_argument(
        "--migration-auto-converge",
        action="store_true",
        help="live transfers slow a guest that writes memory faster than the link carries it, unless a "
        "Migration's spec.convergence says otherwise",
    )
    agent.add_argument(
        "--migration-post-copy",
        action="store_true",
        help="live transfers that pre-copy cannot end switch to post-copy (a failure then loses the guest), "
        "unless a Migration's spec.convergence says otherwise",
    )
    agent.add_argument(
        "--metrics-address",
        default=os.environ.get("KUBENOVA_METRICS_ADDRESS", "127.0.0.1:9464"),
        help="host:port of the Prometheus /metrics endpoint, /healthz and /readyz [127.0.0.1:9464]",
    )
    agent.add_argument(
        "--kubelet-dir",
        default=os.environ.get("KUBELET_DIR", "/var/lib/kubelet"),
        help="the kubelet's root folder, where it mounts claims for holder pods [$KUBELET_DIR]",
    )
    agent.add_argument(
        "--resync-interval",
        type=float,
        default=30.0,
        help="seconds between full comparisons of every domain with its spec [30]",
    )
    agent.add_argument(
        "--diagnostics-interval",
        type=float,
        default=60.0,
        help="seconds between diagnostics reads into status and /metrics [60]",
    )
    agent.add_argument(
        "--guest-agent-interval",
        type=float,
        default=30.0,
        help="seconds between looks at every running guest's QEMU guest agent (status.guestAgent); its "
        "connecting and going away are seen at once [30]",
    )
    agent.add_argument(
        "--image-cache-interval",
        type=float,
        default=2400.0,
        help="seconds between passes of the image cache manager (Nova's image_cache_manager_interval) [2400]",
    )
    agent.add_argument(
        "--image-cache-grace",
        type=float,
        default=86400.0,
        help="a cached base image no instance uses is removed after this many seconds unused [86400]",
    )
    agent.add_argument(
        "--import-max-size-gib",
        type=float,
        default=50.0,
        help="the largest boot image imported by url or from a registry, in GiB [50]",
    )
    agent.add_argument(
        "--import-concurrency",
        type=int,
        default=2,
        help="imports that run at once on this node; more wait for a slot [2]",
    )
    agent.add_argument(
        "--soft-reboot-timeout",
        type=float,
        default=60.0,
        help="seconds a guest gets to honour an ACPI shutdown before a hard reboot [60]",
    )
    agent.add_argument(
        "--restart-delay",
        type=float,
        default=10.0,
        help="seconds before restarting a domain that stopped outside Kubernetes [10]",
    )
    agent.add_argument(
        "--io-error-delay",
        type=float,
        default=30.0,
        help="seconds before letting a guest paused on a disk I/O error (a full disk) run again; doubled "
        "each time it stops again [30]",
    )
    agent.add_argument(
        "--io-error-max-delay",
        type=float,
        default=600.0,
        help="the longest wait between two such tries [600]",
    )
    agent.add_argument(
        "--reboot-timeout",
        type=float,
        default=180.0,
        help="a reboot still unfinished after this many seconds is finished hard [180]",
    )
    agent.add_argument(
        "--rescue-timeout",
        type=float,
        default=0.0,
        help="warn (Event) when an instance stays in rescue longer than this; 0 never [0]",
    )

    access_settings.add_arguments(agent)
    network_flags.add_arguments(agent)
    return top


def _agent(args: argparse.Namespace) -> int:
    from kubenova.driver.base import ComputeDriver, Convergence
    from kubenova.driver.images import ImageStore
    from kubenova.handlers.agent import app as agent
    from kubenova.handlers.agent import node_reporter
    from kubenova.handlers.agent.instances import Settings
    from kubenova.handlers.agent.node_network import NetworkSettings
    from kubenova.handlers.agent.translate import NetworkAllowList

    images = ImageStore(args.image_store)
    import_max_bytes = int(args.import_max_size_gib * 2**30)
    driver: ComputeDriver
    if args.driver == "fake":
        from kubenova.driver.fake import FakeDriver
        from kubenova.driver.imports import Importer

        # The in-memory hypervisor knows the store's files by name, with their bytes.
        files = sorted(images.root.glob("*")) if images.root.is_dir() else []
        driver = FakeDriver(
            args.node,
            images={f.name: f.read_bytes() for f in files if f.is_file()},
            importer=Importer(
                pathlib.Path(args.instances_dir) / "_base", import_max_bytes, args.import_concurrency
            ),
        )
    else:
        from kubenova.driver.libvirt.driver import LibvirtDriver
        from kubenova.driver.libvirt.transport import MigrationTransport

        driver = LibvirtDriver(
            args.libvirt_uri,
            args.domain_type,
            args.instances_dir,
            images,
            args.volume_store,
            MigrationTransport(args.migration_pki_dir, args.insecure_migration),
            import_max_bytes,
            args.import_concurrency,
            args.libvirt_dnsmasq_dir,
        )
    settings = Settings(
        soft_reboot_timeout=args.soft_reboot_timeout,
        restart_delay=args.restart_delay,
        io_error_delay=args.io_error_delay,
        io_error_max_delay=args.io_error_max_delay,
        rescue_timeout=args.rescue_timeout,
        reboot_timeout=args.reboot_timeout,
        networks=NetworkAllowList(
            tuple(args.default_network or ["default"]), args.namespace_networks, args.network_name
        ),
    )
    host_ip = args.host_ip or node_reporter.host_ip()
    agent.run(
        agent.AgentConfig(
            node=args.node,
            host_ip=host_ip,
            migration_uri=args.migration_uri or f"qemu+tls://{host_ip}/system",
            metrics_address=args.metrics_address,
            resync_interval=args.resync_interval,
            diagnostics_interval=args.diagnostics_interval,
            guest_agent_interval=args.guest_agent_interval,
            image_cache_interval=args.image_cache_interval,
            image_cache_grace=args.image_cache_grace,
            migration_timeout_per_gib=args.migration_completion_timeout_per_gib,
            lease_seconds=args.lease_duration,
            kubernetes_node=args.kubernetes_node,
            kubelet_dir=pathlib.Path(args.kubelet_dir),
            migration_convergence=Convergence(args.migration_auto_converge, args.migration_post_copy),
            settings=settings,
            network=NetworkSettings(
                args.network_name,
                args.network_bridge,
                args.network_subnet,
                args.network_pool,
                args.network_prefix,
                args.provider_firewall,
            ),
            access=access_settings.from_args(args),
        ),
        driver,
        images,
    )
    return 0


def _probe(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return 0 if answer.status == 200 else 1
    except (OSError, urllib.error.URLError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command != "probe":  # a long-lived process: before its first thread
        memory.limit_arenas()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # kopf logs every handled watch event at INFO
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("leaderelection").setLevel(logging.WARNING)  # logs every renewal
    if args.command == "controller":
        from kubenova.handlers.controller import main as controller

        controller.run(
            args.lease_namespace,
            controller.MigrationLimits(args.max_migrations_per_node, args.max_migrations),
            args.health_address,
            args.watch_nodes,
            args.holder_image,
        )
    elif args.command == "access":
        from kubenova.handlers.access import main as access

        return access.run(args)
    elif args.command == "probe":
        return _probe(args.url)
    elif args.command == "agent":
        if not args.node:
            print("error: the agent needs its node name: set NODE_NAME or pass --node", file=sys.stderr)
            return 2
        return _agent(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
