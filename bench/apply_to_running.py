"""Apply → status Running (and → the guest's boot marker) through the real API and agent, against
raw libvirt define+start of the identical domain XML; then the agent's memory with N guests.

Run: python -m bench.apply_to_running [--runs 20] [--guests 10]. Uses the test ground with its
controller and agent (starts it if needed). Runs alternate kubenova and raw libvirt so both see
the same machine state. Prints markdown tables; no figure here is asserted anywhere.
"""
from __future__ import annotations

import argparse
import pathlib
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import kubernetes
import libvirt

from bench.driver_spawn import percentile, row, wait_marker
from kubenova.handlers.common import GROUP, VERSION, VIRTUALINSTANCES
from kubenova.testground import ground as testground
from kubenova.testground import guest, procs

NAMESPACE = "bench"


def body(name: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualInstance", "metadata": {"name": name},
            "spec": {"flavor": {"vcpus": 1, "memoryMiB": 96},
                     "boot": {"kernel": {"image": guest.KERNEL, "initrd": guest.INITRD, "cmdline": guest.CMDLINE}}}}


def running(obj: dict[str, Any]) -> bool:
    status = obj.get("status") or {}
    return status.get("powerState") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


def time_until(custom: kubernetes.client.CustomObjectsApi, name: str, act: Callable[[], Any],
               done: Callable[[dict[str, Any]], bool]) -> tuple[float, Any]:
    """Seconds from ``act()`` to the first watch event of ``name`` that is ``done``, and what act returned."""
    watch = kubernetes.watch.Watch()
    version = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES)["metadata"][
        "resourceVersion"]
    started = time.monotonic()
    result = act()
    for event in watch.stream(custom.list_namespaced_custom_object, GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES,
                              resource_version=version, field_selector=f"metadata.name={name}", timeout_seconds=120):
        if done(event["object"]):
            watch.stop()
            return time.monotonic() - started, result
    raise TimeoutError(f"{name} did not get there")


def apply_and_wait(custom: kubernetes.client.CustomObjectsApi, name: str) -> tuple[float, str]:
    """Seconds from the create call to the watch event that says Running, and the object's UID."""
    return time_until(custom, name, lambda: custom.create_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES, body(name))["metadata"]["uid"], running)


def delete_all(custom: kubernetes.client.CustomObjectsApi) -> None:
    for item in custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES)["items"]:
        custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES, item["metadata"]["name"])
    deadline = time.monotonic() + 180
    while custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES)["items"]:
        if time.monotonic() > deadline:
            raise TimeoutError("instances were not deleted")
        time.sleep(0.2)


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def main(argv: list[str] | None = None) -> None:
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("--runs", type=int, default=20)
    args.add_argument("--guests", type=int, default=10)
    opts = args.parse_args(argv)
    ground = testground.up()
    client = kubernetes.config.new_client_from_config(config_file=str(ground.layout.kubeconfig))
    custom = kubernetes.client.CustomObjectsApi(client)
    core = kubernetes.client.CoreV1Api(client)
    if not core.list_namespace(field_selector=f"metadata.name={NAMESPACE}").items:
        core.create_namespace({"metadata": {"name": NAMESPACE}})
    delete_all(custom)
    conn = libvirt.open(ground.libvirt_uri)
    raw_dir = ground.node_dir() / "bench-raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    ours_t, ours_m, raw_t, raw_m = [], [], [], []
    for i in range(opts.runs):
        name = f"lat-{i}"
        started = time.monotonic()
        seconds, uid = apply_and_wait(custom, name)
        ours_t.append(seconds)
        ours_m.append(wait_marker(ground.console_log(uid), started))
        xml = ET.fromstring(conn.lookupByUUIDString(uid).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        delete_all(custom)
        # The identical definition, under a new identity: define + start, as a person would with virsh.
        xml.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
        xml.find("name").text = f"bench_raw-{i}"  # type: ignore[union-attr]
        console = raw_dir / f"raw-{i}.log"
        xml.find("devices/serial/source").set("path", str(console))  # type: ignore[union-attr]
        started = time.monotonic()
        dom = conn.defineXML(ET.tostring(xml, encoding="unicode"))
        dom.create()
        raw_t.append(time.monotonic() - started)
        raw_m.append(wait_marker(console, started))
        dom.destroy()
        dom.undefine()
        console.unlink()
    conn.close()
    print(f"apply → Running through the API vs libvirt define+start of the same XML, {opts.runs} runs, "
          "ms (kubenova / raw (ratio))\n")
    print("| step | p50 | p95 | max |\n| --- | --- | --- | --- |")
    print(row("apply → status Running", ours_t, raw_t))
    print(row("apply → boot marker", ours_m, raw_m))
    print(f"\noverhead: p50 {(percentile(ours_t, 50) - percentile(raw_t, 50)) * 1000:.0f} ms, "
          f"p95 {(percentile(ours_t, 95) - percentile(raw_t, 95)) * 1000:.0f} ms")

    agent = procs.running_pid(ground.layout, f"agent-{ground.node}")
    controller = procs.running_pid(ground.layout, "controller")
    assert agent and controller, "the test ground's kubenova processes run"
    idle = rss_mib(agent), rss_mib(controller)
    for i in range(opts.guests):
        apply_and_wait(custom, f"rss-{i}")
    time.sleep(12)  # two diagnostics rounds, so the metrics and caches are filled
    loaded = rss_mib(agent), rss_mib(controller)
    conn = libvirt.open(ground.libvirt_uri)
    reaction = []
    for i in range(opts.guests):  # out of band, as an admin with virsh would
        uid = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES,
                                                  f"rss-{i}")["metadata"]["uid"]
        dom = conn.lookupByUUIDString(uid)

        def destroy() -> float:
            started = time.monotonic()
            dom.destroy()  # returns once QEMU is gone: about a second under TCG
            return time.monotonic() - started

        seconds, destroying = time_until(custom, f"rss-{i}", destroy,
                                         lambda o: (o.get("status") or {}).get("powerState") == "Stopped")
        reaction.append(seconds - destroying)
    conn.close()
    delete_all(custom)
    print(f"\nmemory (RSS, MiB) | idle | {opts.guests} running guests | per guest\n| --- | --- | --- | --- |")
    for label, before, after in (("agent", idle[0], loaded[0]), ("controller", idle[1], loaded[1])):
        print(f"| {label} | {before:.1f} | {after:.1f} | {(after - before) / opts.guests * 1024:.0f} KiB |")
    print(f"\nvirsh destroy returned → status.powerState Stopped ({opts.guests} guests): p50 "
          f"{percentile(reaction, 50) * 1000:.0f} ms, p95 {percentile(reaction, 95) * 1000:.0f} ms, "
          f"max {max(reaction) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
