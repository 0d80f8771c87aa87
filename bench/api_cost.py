"""API requests per create → Running and per delete, from the real apiserver's own counters."""

from __future__ import annotations

import collections

from bench.common import Bench, Result, apply_and_wait, counted, delete_all, instance, request_counts

#: What a lifecycle touches; Leases (heartbeats, leader election) and ComputeNodes tick on their own.
RESOURCES = ("virtualinstances", "events", "secrets")
WRITES = ("POST", "PUT", "PATCH", "DELETE", "APPLY")
USER = {("POST", "virtualinstances", ""), ("DELETE", "virtualinstances", "")}


def run(bench: Bench, runs: int) -> Result:
    per_create: collections.Counter[tuple[str, str, str]] = collections.Counter()
    per_delete: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for i in range(runs):
        before = request_counts(bench)
        apply_and_wait(bench, instance(f"cost-{i}"))
        middle = request_counts(bench)
        delete_all(bench)
        after = request_counts(bench)
        per_create.update(counted(before, middle, RESOURCES))
        per_delete.update(counted(middle, after, RESOURCES))

    def rows(counts: collections.Counter[tuple[str, str, str]]) -> list[str]:
        return [
            f"| {verb} | {resource}{'/' + sub if sub else ''} | {counts[verb, resource, sub] / runs:.1f} |"
            for verb, resource, sub in sorted(counts)
        ]

    def ours(counts: collections.Counter[tuple[str, str, str]], verbs: tuple[str, ...]) -> float:
        return sum(v for k, v in counts.items() if k[0] in verbs and k not in USER) / runs

    writes_create, writes_delete = ours(per_create, WRITES), ours(per_delete, WRITES)
    lines = [
        f"Averages over {runs} create → Running → delete cycles, by verb and resource, from "
        "`apiserver_request_total` (everyone's requests, the user's included; the delete is measured "
        "until the object is gone, with the benchmark polling for it).",
        "",
        "| verb | resource | per create → Running |",
        "| --- | --- | --- |",
        *rows(per_create),
        "",
        "| verb | resource | per delete |",
        "| --- | --- | --- |",
        *rows(per_delete),
        "",
        f"kubenova's own writes: {writes_create:.1f} per create → Running, {writes_delete:.1f} per delete "
        f"(target ≤ 3 each: {'met' if writes_create <= 3 and writes_delete <= 3 else 'missed'}). A "
        "diagnostics round falling inside a window adds one status write.",
    ]
    return Result(
        "API cost",
        lines,
        {
            "writes_per_create": writes_create,
            "writes_per_delete": writes_delete,
            "per_create": {"/".join(k): v / runs for k, v in per_create.items()},
            "per_delete": {"/".join(k): v / runs for k, v in per_delete.items()},
        },
    )
