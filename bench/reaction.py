"""Out-of-band power change (virsh destroy) → status.powerState, measured from the moment libvirt is done."""

from __future__ import annotations

import time

import libvirt

from bench.common import Bench, Result, apply_and_wait, delete_all, instance, ms, percentile, time_until


def run(bench: Bench, count: int) -> Result:
    conn = libvirt.open(bench.ground.libvirt_uri)
    reaction, destroying = [], []
    for i in range(count):
        name = f"react-{i}"
        _, uid = apply_and_wait(bench, instance(name))
        dom = conn.lookupByUUIDString(uid)

        def destroy(dom: libvirt.virDomain = dom) -> float:
            started = time.monotonic()
            dom.destroy()  # returns once QEMU is gone
            return time.monotonic() - started

        seconds, took = time_until(
            bench, name, destroy, lambda o: (o.get("status") or {}).get("powerState") == "Stopped"
        )
        reaction.append(seconds - took)
        destroying.append(took)
    conn.close()
    delete_all(bench)
    p95 = percentile(reaction, 95)
    lines = [
        f"{count} running guests destroyed with libvirt (as `virsh destroy` does), one at a time.",
        "",
        "| step | p50 | p95 | max |",
        "| --- | --- | --- | --- |",
        f"| destroy returned → status.powerState Stopped seen | {ms(percentile(reaction, 50))} | {ms(p95)} | "
        f"{ms(max(reaction))} |",
        f"| (the destroy call itself, QEMU teardown) | {ms(percentile(destroying, 50))} | "
        f"{ms(percentile(destroying, 95))} | {ms(max(destroying))} |",
        "",
        f"Target p95 ≤ 1000 ms: {'met' if p95 <= 1.0 else 'missed'}.",
    ]
    return Result(
        "Reaction: out-of-band stop → status", lines, {"reaction_s": reaction, "destroy_s": destroying}
    )
