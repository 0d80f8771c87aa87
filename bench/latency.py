"""Apply → Running and → boot marker through the API, next to libvirt define+start of the same XML,
with a breakdown of where kubenova's time goes."""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET

import libvirt

from bench.common import (
    NAMESPACE,
    Bench,
    Result,
    create,
    delete_all,
    instance,
    list_version,
    ms,
    percentile,
    raw_start,
    raw_stop,
    running,
    vs,
    watch,
)
from bench.driver_spawn import wait_marker
from kubenova.handlers.shared import NODE_LABEL


def _domain_started(conn: libvirt.virConnect, name: str, started: float, out: dict[str, float]) -> None:
    """Poll libvirt (local socket, cheap) for the moment the domain runs."""
    deadline = started + 120
    while time.monotonic() < deadline:
        try:
            if conn.lookupByName(name).isActive():
                out["domain"] = time.monotonic() - started
                return
        except libvirt.libvirtError:
            pass
        time.sleep(0.002)


def run(bench: Bench, runs: int) -> Result:
    ground = bench.ground
    libvirt.registerErrorHandler(lambda *_: None, None)  # the poller's "not yet" lookups are expected
    conn = libvirt.open(ground.libvirt_uri)
    raw_dir = ground.node_dir() / "bench-raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    ours_t, ours_m, raw_t, raw_m = [], [], [], []
    bound, domain, reported = [], [], []
    for i in range(runs):
        name = f"lat-{i}"
        marks: dict[str, float] = {}
        version = list_version(bench)
        started = time.monotonic()
        poller = threading.Thread(target=_domain_started, args=(conn, f"{NAMESPACE}_{name}", started, marks))
        poller.start()
        uid = create(bench, instance(name))
        for event in watch(bench, version, 120, field_selector=f"metadata.name={name}"):
            obj = event["object"]
            if "bound" not in marks and NODE_LABEL in (obj["metadata"].get("labels") or {}):
                marks["bound"] = time.monotonic() - started
            if running(obj):
                marks["running"] = time.monotonic() - started
                break
        poller.join()
        ours_t.append(marks["running"])
        bound.append(marks["bound"])
        domain.append(marks["domain"] - marks["bound"])
        reported.append(marks["running"] - marks["domain"])
        ours_m.append(wait_marker(ground.console_log(uid), started))
        xml = ET.fromstring(conn.lookupByUUIDString(uid).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        delete_all(bench)
        # The identical definition under a new identity: define + start, as a person would with virsh.
        console = raw_dir / f"raw-{i}.log"
        started = time.monotonic()
        dom, nwfilter = raw_start(conn, xml, f"bench_raw-{i}", console)
        raw_t.append(time.monotonic() - started)
        raw_m.append(wait_marker(console, started))
        raw_stop(dom, nwfilter)
        console.unlink()
    conn.close()
    overhead = [percentile(ours_t, p) - percentile(raw_t, p) for p in (50, 95)]
    lines = [
        f"{runs} sequential creates of the test VM (1 vCPU, 96 MiB, TCG), alternating with libvirt "
        "define+start of the identical XML. ms, kubenova / raw (ratio).",
        "",
        "| step | p50 | p95 | max |",
        "| --- | --- | --- | --- |",
        f"| apply → status Running | {vs(ours_t, raw_t, 50)} | {vs(ours_t, raw_t, 95)} | "
        f"{vs(ours_t, raw_t, 100)} |",
        f"| apply → guest boot marker | {vs(ours_m, raw_m, 50)} | {vs(ours_m, raw_m, 95)} | "
        f"{vs(ours_m, raw_m, 100)} |",
        "",
        f"Overhead over raw libvirt: p50 {ms(overhead[0])} ms, p95 {ms(overhead[1])} ms "
        "(target ≤ 100 ms and ≤ 250 ms: "
        f"{'met' if overhead[0] <= 0.1 and overhead[1] <= 0.25 else 'missed'}).",
        "",
        "Where kubenova's time goes (p50 / p95, ms):",
        "",
        "| phase | p50 | p95 |",
        "| --- | --- | --- |",
        f"| create → bound (controller placement, one PATCH) | {ms(percentile(bound, 50))} | "
        f"{ms(percentile(bound, 95))} |",
        f"| bound → libvirt shows the domain active (agent's watch event, define, QEMU launched) | "
        f"{ms(percentile(domain, 50))} | {ms(percentile(domain, 95))} |",
        f"| active → status Running seen (libvirt's start returns once QEMU is up — the raw baseline spends "
        f"this too — then one status PATCH and the watch) | {ms(percentile(reported, 50))} | "
        f"{ms(percentile(reported, 95))} |",
    ]
    return Result(
        "Latency: apply → Running",
        lines,
        {
            "runs": runs,
            "kubenova_running_s": ours_t,
            "raw_running_s": raw_t,
            "kubenova_marker_s": ours_m,
            "raw_marker_s": raw_m,
            "bound_s": bound,
            "bound_to_domain_s": domain,
            "domain_to_status_s": reported,
        },
    )
