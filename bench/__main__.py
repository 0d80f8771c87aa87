"""Run every benchmark against the test ground and write docs/benchmarks.md and a JSON file.

    python -m bench            # the full run (about 15 minutes here); writes docs/benchmarks.md
    python -m bench --smoke    # tiny counts so the code never rots; writes under the test ground

Each section shows kubenova next to its baseline measured in the same run (raw libvirt, or the
peers' published figures where there is no local baseline). No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable

from bench import api_cost, burst, imports, latency, memory, migration, network, reaction, scale
from bench.common import Result, connect
from testground import ground as testground
from testground.kube import REPO

#: The burst is 30, not the 50 the issue names: 50 one-vCPU instances do not fit this 2-CPU host under
#: Nova's default CPU overcommit (16×, so 32 vCPUs), and the controller rightly refuses the rest.
FULL = {
    "latency": 20,
    "burst": 30,
    "api": 5,
    "fake": 100,
    "real": 20,
    "agents": 20,
    "scale": 1000,
    "react": 10,
    "migrate": 5,
    "imports": 3,
    "network": 10,
}
SMOKE = {
    "latency": 2,
    "burst": 3,
    "api": 1,
    "fake": 3,
    "real": 1,
    "agents": 2,
    "scale": 6,
    "react": 2,
    "migrate": 1,
    "imports": 1,
    "network": 1,
}


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = int(pathlib.Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return f"{os.cpu_count()} CPUs ({cpu}), {mem} GiB, QEMU TCG (no KVM), commit {commit or 'unknown'}"


def render(results: list[Result], header: str) -> str:
    out = [
        "<!-- Written by `python -m bench`; run it again to refresh. -->",
        "# kubenova benchmarks",
        "",
        header,
        "",
        "Every figure comes from one run on the machine named above, next to its baseline measured in the "
        "same run.",
        "",
    ]
    for index, result in enumerate(results, 1):
        out += [f"## {index}. {result.title}", "", *result.lines, ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny counts; do not touch docs/")
    parser.add_argument("--out", type=pathlib.Path, help="the markdown file [docs/benchmarks.md]")
    args = parser.parse_args(argv)
    counts = SMOKE if args.smoke else FULL
    ground = testground.up()
    out = args.out or (
        ground.layout.state / "bench-smoke.md" if args.smoke else REPO / "docs" / "benchmarks.md"
    )
    bench = connect(ground)
    sections: list[tuple[str, Callable[[], Result]]] = [
        ("latency", lambda: latency.run(bench, counts["latency"])),
        ("burst", lambda: burst.run(bench, counts["burst"])),
        ("api cost", lambda: api_cost.run(bench, counts["api"])),
        ("memory", lambda: memory.run(bench, counts["fake"], counts["real"], 0.0 if args.smoke else 3.0)),
        ("scale", lambda: scale.run(bench, counts["agents"], counts["scale"])),
        ("reaction", lambda: reaction.run(bench, counts["react"])),
        ("migration", lambda: migration.run(bench, counts["migrate"])),
        ("imports", lambda: imports.run(bench, counts["imports"])),
        ("network", lambda: network.run(bench, counts["network"])),
    ]
    results = []
    for index, (name, section) in enumerate(sections, 1):
        print(f"[bench] {index}/{len(sections)} {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        results.append(section())
        print(f"[bench] {name} took {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = f"Run {stamp} on {machine()}" + (" — smoke counts, not figures to quote" if args.smoke else "")
    out.write_text(render(results, header))
    out.with_suffix(".json").write_text(
        json.dumps({"header": header, "counts": counts, **{r.title: r.figures for r in results}}, indent=1)
    )
    print(out.read_text())


if __name__ == "__main__":
    main()
