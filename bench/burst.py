"""Many VMs applied at once: time until all run, next to libvirt starting the same domains with the
agent's parallelism."""

from __future__ import annotations

import concurrent.futures
import time
import xml.etree.ElementTree as ET

import libvirt

from bench.common import (
    NAMESPACE,
    Bench,
    Result,
    create_all_and_wait,
    delete_all,
    instance,
    ms,
    raw_start,
    raw_stop,
)
from kubenova.handlers.agent.app import WORKERS

MEMORY_MIB = 64


def run(bench: Bench, count: int) -> Result:
    ground = bench.ground
    applied, ours = create_all_and_wait(bench, [instance(f"burst-{i}", MEMORY_MIB) for i in range(count)])
    conn = libvirt.open(ground.libvirt_uri)
    template = ET.fromstring(
        conn.lookupByName(f"{NAMESPACE}_burst-0").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    )
    delete_all(bench)
    raw_dir = ground.node_dir() / "bench-raw"
    raw_dir.mkdir(parents=True, exist_ok=True)

    def start(i: int) -> tuple[libvirt.virDomain, libvirt.virNWFilter]:
        return raw_start(conn, template, f"bench_burst-{i}", raw_dir / f"burst-{i}.log")

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        domains = list(pool.map(start, range(count)))
    raw = time.monotonic() - started
    for dom, nwfilter in domains:
        raw_stop(dom, nwfilter)
    for log in raw_dir.glob("burst-*.log"):
        log.unlink()
    conn.close()
    ratio = ours / raw
    lines = [
        f"{count} instances of {MEMORY_MIB} MiB created back to back through the API (the creates took "
        f"{ms(applied)} ms), against libvirt define+start of the same domains from {WORKERS} "
        "threads, the agent's parallelism.",
        "",
        "| | all running, ms |",
        "| --- | --- |",
        f"| kubenova (first create → last status Running seen) | {ms(ours)} |",
        f"| raw libvirt, {WORKERS} threads | {ms(raw)} |",
        f"| ratio | {ratio:.2f}× (target ≤ 1.2×: {'met' if ratio <= 1.2 else 'missed'}) |",
    ]
    return Result(
        f"Burst: {count} at once",
        lines,
        {"count": count, "kubenova_s": ours, "raw_s": raw, "creates_s": applied},
    )
