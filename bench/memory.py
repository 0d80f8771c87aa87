"""Process memory: the controller and an agent idle, with 100 instances (in-memory driver) and with
real guests; the per-VM cost outside QEMU."""

from __future__ import annotations

import time

from bench.common import (
    FAKE_INITRD,
    FAKE_KERNEL,
    Bench,
    Result,
    apply_and_wait,
    create_all_and_wait,
    delete_all,
    instance,
    rss_mib,
    start_fake_agents,
    stop_fake_agents,
)
from testground import libvirt_host, procs

FAKE_NODE = "bench-mem"


def _libvirtd_pid(bench: Bench) -> int:
    path = libvirt_host.host_dir(bench.ground.layout, bench.ground.node) / "libvirtd.pid"
    return int(path.read_text().strip())


def run(bench: Bench, fake_count: int, real_count: int, settle: float = 3.0) -> Result:
    """``settle``: seconds to let RSS settle before each reading (the smoke run, which quotes no figure,
    takes none); the real guests' reading waits four times as long, two diagnostics rounds."""
    layout = bench.ground.layout
    controller = procs.running_pid(layout, "controller")
    agent = procs.running_pid(layout, f"agent-{bench.ground.node}")
    assert controller and agent, "the test ground's controller and agent run"
    # Below Linux's ephemeral ports (see testground.kube.ETCD_PORT): an outgoing connection took 39490 once.
    start_fake_agents(bench, [FAKE_NODE], first_port=29690)
    fake = procs.running_pid(layout, f"agent-{FAKE_NODE}")
    assert fake
    try:
        time.sleep(settle)
        fake_idle, controller_idle = rss_mib(fake), rss_mib(controller)
        create_all_and_wait(
            bench,
            [
                instance(f"mem-{i}", node=FAKE_NODE, kernel=FAKE_KERNEL, initrd=FAKE_INITRD)
                for i in range(fake_count)
            ],
        )
        time.sleep(settle)
        fake_loaded, controller_loaded = rss_mib(fake), rss_mib(controller)
        delete_all(bench)
    finally:
        stop_fake_agents(bench, [FAKE_NODE])
    libvirtd = _libvirtd_pid(bench)
    agent_idle, libvirtd_idle = rss_mib(agent), rss_mib(libvirtd)
    for i in range(real_count):
        apply_and_wait(bench, instance(f"real-{i}", 64))
    time.sleep(settle * 4)  # two diagnostics rounds of the test ground's agent: caches and metrics filled
    agent_loaded, libvirtd_loaded = rss_mib(agent), rss_mib(libvirtd)
    delete_all(bench)
    per_fake = (fake_loaded - fake_idle) / fake_count * 1024
    per_real = (agent_loaded - agent_idle + libvirtd_loaded - libvirtd_idle) / real_count * 1024
    lines = [
        "RSS in MiB (VmRSS).",
        "",
        "| process | idle | loaded | per instance |",
        "| --- | --- | --- | --- |",
        f"| agent, in-memory driver, {fake_count} instances | {fake_idle:.1f} | {fake_loaded:.1f} | "
        f"{per_fake:.0f} KiB |",
        f"| controller, same {fake_count} instances | {controller_idle:.1f} | {controller_loaded:.1f} | "
        f"{(controller_loaded - controller_idle) / fake_count * 1024:.0f} KiB |",
        f"| agent, libvirt, {real_count} real guests | {agent_idle:.1f} | {agent_loaded:.1f} | "
        f"{(agent_loaded - agent_idle) / real_count * 1024:.0f} KiB |",
        f"| libvirtd, same {real_count} guests | {libvirtd_idle:.1f} | {libvirtd_loaded:.1f} | "
        f"{(libvirtd_loaded - libvirtd_idle) / real_count * 1024:.0f} KiB |",
        "",
        f"Per-VM overhead outside QEMU (agent + libvirtd): {per_real:.0f} KiB; KubeVirt's is about "
        "220 MiB (virt-launcher pod). Targets: ≤ 1 MiB per VM "
        f"({'met' if per_real <= 1024 and per_fake <= 1024 else 'missed'}); agent ≤ 80 MiB at 100 VMs: "
        f"{fake_loaded:.1f} MiB on the in-memory driver ({'met' if fake_loaded <= 80 else 'missed'}), "
        f"{agent_loaded:.1f} MiB on the libvirt driver with the {real_count} guests this machine can run "
        f"({'met' if agent_loaded <= 80 else 'missed'}: `import libvirt` alone adds about 10 MiB, libvirt's "
        "client library and the libraries it links, which the in-memory driver does not load); ≤ 100 KiB "
        f"per instance beyond that ({per_fake:.0f} KiB: {'met' if per_fake <= 100 else 'missed'}). "
        "Most of an agent's RSS is code before any work: Python with kopf and the official client "
        "(which kopf loads too) is about 62 MiB here. The agent does without the client's CoreV1Api, "
        "whose module loads ~250 pydantic models at its first use (20 MiB): its four core/v1 calls go "
        "through the client's ApiClient as JSON (handlers/core_v1.py).",
    ]
    return Result(
        "Memory",
        lines,
        {
            "fake_agent_idle_mib": fake_idle,
            "fake_agent_loaded_mib": fake_loaded,
            "controller_idle_mib": controller_idle,
            "controller_loaded_mib": controller_loaded,
            "agent_idle_mib": agent_idle,
            "agent_loaded_mib": agent_loaded,
            "libvirtd_idle_mib": libvirtd_idle,
            "libvirtd_loaded_mib": libvirtd_loaded,
            "fake_count": fake_count,
            "real_count": real_count,
        },
    )
