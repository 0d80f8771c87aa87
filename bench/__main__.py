"""Run every benchmark against the test ground and write docs/benchmarks.md and a JSON file.

    python -m bench            # the full run (about 50 minutes on 2 CPUs); writes docs/benchmarks.md
    python -m bench --smoke    # tiny counts so the code never rots; writes under the test ground
    python -m bench --scale    # only the scale run at 10000 instances on 100 agents and the write-storm
                               # run; writes docs/benchmarks-scale.md and its plot (--scale N/AGENTS)

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
import time
from collections.abc import Callable

from bench import api_cost, burst, image, imports, latency, memory, migration, network, reaction, scale, storm
from bench.common import Bench, Result, connect
from bench.timeline import say
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
    "pending": 1000,
    "changes": 100,
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
    "pending": 4,
    "changes": 3,
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


def headline(result: Result) -> str:
    """The figure a section just measured: its own headline, else its first table row."""
    rows = [line for line in result.lines if line.startswith("| ") and not line.startswith("| ---")]
    return result.headline or (rows[1] if len(rows) > 1 else result.title)


def scale_counts(value: str) -> tuple[int, int]:
    """``N/AGENTS`` (10000/100) as two numbers."""
    count, _, agents = value.partition("/")
    return int(count), int(agents or 100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny counts; do not touch docs/")
    parser.add_argument(
        "--scale",
        nargs="?",
        const="10000/100",
        metavar="N/AGENTS",
        help="only the scale run (10000/100 unless given) and the write-storm run; "
        "writes docs/benchmarks-scale.md",
    )
    parser.add_argument("--out", type=pathlib.Path, help="the markdown file [docs/benchmarks.md]")
    args = parser.parse_args(argv)
    counts = dict(SMOKE if args.smoke else FULL)
    ground = testground.up()
    default = "benchmarks-scale.md" if args.scale else "benchmarks.md"
    out = args.out or (ground.layout.state / "bench-smoke.md" if args.smoke else REPO / "docs" / default)
    plot_to = out.with_suffix(".png")
    bench = connect(ground)
    if args.scale:
        counts["scale"], counts["agents"] = scale_counts(args.scale)
        sections = [
            ("scale", lambda: scale.run(bench, counts["agents"], counts["scale"], plot_to)),
            ("write storm", lambda: storm.run(bench, counts["pending"], counts["changes"])),
        ]
    else:
        sections = every_section(bench, counts, args.smoke, plot_to)
    results = run_sections(sections)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = f"Run {stamp} on {machine()}" + (" — smoke counts, not figures to quote" if args.smoke else "")
    out.write_text(render(results, header))
    out.with_suffix(".json").write_text(
        json.dumps({"header": header, "counts": counts, **{r.title: r.figures for r in results}}, indent=1)
    )
    print(out.read_text())


def every_section(
    bench: Bench, counts: dict[str, int], smoke: bool, plot_to: pathlib.Path
) -> list[tuple[str, Callable[[], Result]]]:
    quiet = 1.0 if smoke else 5.0  # the storm's seconds without a status write; smoke figures are not quoted
    return [
        ("latency", lambda: latency.run(bench, counts["latency"])),
        ("burst", lambda: burst.run(bench, counts["burst"])),
        ("api cost", lambda: api_cost.run(bench, counts["api"])),
        ("memory", lambda: memory.run(bench, counts["fake"], counts["real"], 0.0 if smoke else 3.0)),
        ("scale", lambda: scale.run(bench, counts["agents"], counts["scale"], plot_to)),
        ("write storm", lambda: storm.run(bench, counts["pending"], counts["changes"], quiet)),
        ("reaction", lambda: reaction.run(bench, counts["react"])),
        ("migration", lambda: migration.run(bench, counts["migrate"])),
        ("imports", lambda: imports.run(bench, counts["imports"])),
        ("network", lambda: network.run(bench, counts["network"])),
        ("image", image.run),
    ]


def run_sections(sections: list[tuple[str, Callable[[], Result]]]) -> list[Result]:
    """Each section in turn, saying on stderr which one runs and, as it ends, what it measured."""
    results = []
    for index, (name, section) in enumerate(sections, 1):
        say(f"{index}/{len(sections)} {name} ...")
        started = time.monotonic()
        results.append(section())
        say(f"{name} took {time.monotonic() - started:.1f} s: {headline(results[-1])}")
    return results


if __name__ == "__main__":
    main()
