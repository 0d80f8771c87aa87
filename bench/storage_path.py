"""A guest's sequential write throughput to a PersistentVolumeClaim next to the same guest's node-local store
volume, in one run on cluster mode's real node; writes docs/benchmarks-storage.md (and .json).

    python -m bench.storage_path [--mib N] [--rounds R]

One test guest gets both volumes: a store volume (a raw file in the node's volume store) and a claim of
the cluster's default StorageClass (local-path: a folder on the node, bind-mounted by the kubelet for the
attachment's holder pod; the guest's disk is disk.img in it). The guest's timed-write hook then writes N
MiB of zeros to each in turn with O_DIRECT (busybox dd, 1 MiB blocks), timed by its own uptime clock, and
again after a reboot for each further round. Both are raw files on the same host file system behind
QEMU (cache=none), so the figure shows what the claim's path (holder pod, kubelet mount) costs, not two
kinds of disk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
from typing import Any

import kubernetes

from bench.__main__ import machine
from bench.common import chart_installed, instance, wait_for
from kubenova.handlers.shared import GROUP, VERSION, VIRTUALINSTANCES, VOLUMEATTACHMENTS
from testground import guest
from testground.kube import REPO

NAMESPACE = "bench-storage"
#: guest device: what it is
DEVICES = {"vdb": "node-local store volume", "vdc": "PersistentVolumeClaim (local-path)"}


def _attachment(name: str, device: str, volume: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VolumeAttachment",
        "metadata": {"name": name},
        "spec": {"instanceRef": {"name": "writer"}, "volume": volume, "device": {"name": device}},
    }


def _timed(console: str) -> dict[str, list[float]]:
    """MiB/s of each TIMED line, by device."""
    found: dict[str, list[float]] = {}
    for dev, mib, start, end in re.findall(rf"{guest.TIMED} (\S+) (\d+) ([\d.]+) ([\d.]+)", console):
        found.setdefault(dev, []).append(int(mib) / max(float(end) - float(start), 0.01))
    return found


def run(
    ground: Any,
    core: kubernetes.client.CoreV1Api,
    custom: kubernetes.client.CustomObjectsApi,
    mib: int,
    rounds: int,
) -> dict[str, list[float]]:
    if not core.list_namespace(field_selector=f"metadata.name={NAMESPACE}").items:
        core.create_namespace({"metadata": {"name": NAMESPACE}})
    size = f"{mib * 2 + 64}Mi"
    core.create_namespaced_persistent_volume_claim(
        NAMESPACE,
        {
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
        },
    )
    vm = instance("writer", memory_mib=128)
    vm["spec"]["rootDisk"] = {"sizeGiB": 1}
    vm["spec"]["boot"]["kernel"]["cmdline"] += f" {guest.timed_hook(list(DEVICES), mib)}"
    uid = custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES, vm)["metadata"][
        "uid"
    ]
    # One after the other: the guest names hot-plugged disks in the order they come (its vda is the root).
    for body in (
        _attachment("local", "vdb", {"name": "bench-local", "sizeGiB": 1}),
        _attachment("claim", "vdc", {"persistentVolumeClaim": {"claimName": "data"}}),
    ):
        custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VOLUMEATTACHMENTS, body)
        name = body["metadata"]["name"]
        wait_for(
            f"volume {name} attached",
            lambda n=name: (
                (
                    custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VOLUMEATTACHMENTS, n).get(
                        "status"
                    )
                    or {}
                ).get("phase")
                == "Attached"
            ),
            timeout=300,
        )
    log = ground.console_log(uid)

    def rounds_done() -> int:
        """Rounds every device has finished."""
        found = _timed(log.read_text(errors="replace"))
        return min((len(v) for v in found.values()), default=0) if len(found) == len(DEVICES) else 0

    for round_ in range(rounds):
        if round_:
            custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                NAMESPACE,
                VIRTUALINSTANCES,
                "writer",
                {"spec": {"actions": {"reboot": {"id": f"round-{round_}", "type": "Hard"}}}},
            )
        wait_for(
            f"round {round_ + 1} of the timed writes", lambda n=round_ + 1: rounds_done() >= n, timeout=600
        )
    return _timed(log.read_text(errors="replace"))


def render(figures: dict[str, list[float]], mib: int) -> str:
    local, claim = figures["vdb"], figures["vdc"]
    rows = [
        f"| {DEVICES[dev]} | {statistics.median(v):.0f} MiB/s | {min(v):.0f}–{max(v):.0f} MiB/s |"
        for dev, v in (("vdb", local), ("vdc", claim))
    ]
    ratio = statistics.median(claim) / statistics.median(local)
    return "\n".join(
        [
            "<!-- Written by `python -m bench.storage_path`; run it again to refresh. -->",
            "# A guest's writes: PersistentVolumeClaim next to a node-local volume",
            "",
            f"Run {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')} on {machine()}, "
            "cluster mode (kubelet, containerd, local-path-provisioner).",
            "",
            f"One test guest writes {mib} MiB of zeros with O_DIRECT to each volume in turn (busybox dd, "
            f"1 MiB blocks), {len(local)} rounds (a hard reboot between rounds), timed by the guest's uptime "
            "clock (10 ms resolution). QEMU under TCG, cache=none, both raw files on one host file system.",
            "",
            "| volume | median | range |",
            "| --- | --- | --- |",
            *rows,
            "",
            f"Claim / node-local: **{ratio:.2f}×** (1.00× is parity). The claim is written second in every "
            "round, after the same guest wrote to the node-local volume, so what separates the two is as "
            "much the order as the path: both are a raw file behind QEMU on the same file system, and the "
            "claim's path adds a bind mount, which costs nothing per write.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.storage_path", description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="MiB written to each volume per round [256]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (a reboot between) [3]")
    args = parser.parse_args(argv)
    with chart_installed() as (ground, client):
        core, custom = kubernetes.client.CoreV1Api(client), kubernetes.client.CustomObjectsApi(client)
        try:
            figures = run(ground, core, custom, args.mib, args.rounds)
        finally:
            core.delete_namespace(NAMESPACE)
    out = REPO / "docs" / "benchmarks-storage.md"
    out.write_text(render(figures, args.mib))
    out.with_suffix(".json").write_text(json.dumps({"mib": args.mib, **figures}, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
