"""The benchmarks run end to end with tiny counts, so they never rot; no timing is asserted."""

from __future__ import annotations

import json

from bench.__main__ import main
from testground import ground as testground


def test_every_benchmark_runs_and_reports(ground: testground.Ground) -> None:
    out = ground.layout.state / "bench-smoke.md"
    out.unlink(missing_ok=True)
    main(["--smoke", "--out", str(out)])
    text = out.read_text()
    for title in (
        "Latency: apply → Running",
        "Burst: 3 at once",
        "API cost",
        "Memory",
        "Scale: 6 instances, 2 agents",
        "Reaction: out-of-band stop → status",
        "Live migration",
        "No write storms: 4 pending, 3 capacity changes",
        "Image",
    ):
        assert f". {title}\n" in text, title
    figures = json.loads(out.with_suffix(".json").read_text())
    assert len(figures["Latency: apply → Running"]["kubenova_running_s"]) == 2
    assert figures["API cost"]["writes_per_create"] > 0
    scale = figures["Scale: 6 instances, 2 agents"]
    assert sum(scale["own"].values()) == 6
    assert all(scale["watch_events"][node] > 0 for node, own in scale["own"].items() if own)
    moves = figures["Live migration"]
    assert len(moves["kubenova"]) == len(moves["virsh"]) == 1 and moves["virsh"][0]["downtime_s"] > 0
    assert 0 < moves["kubenova"][0]["arrived_s"] <= moves["kubenova"][0]["wall_s"]
