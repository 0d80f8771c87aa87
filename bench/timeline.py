"""Per-instance timestamps for the scale runs (client-side create, first bound, first Running), kept by a
watch of the bench's own, its progress on stderr while the run goes, and the plot of created and Running
against time.

The watch runs in a thread, so the creates and the wait share one clock and one picture: the creates do
not slow down to read events, and no event is read late because a create blocked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import kubernetes

from bench.common import Bench, create, list_version, running, watch
from kubenova.handlers.shared import NODE_LABEL


def say(line: str) -> None:
    """One progress line on stderr (the figures go to the doc; this is for the person waiting)."""
    print(f"[bench] {line}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Timeline:
    """Monotonic seconds since ``start`` of each instance's create, bind and first Running."""

    start: float = dataclasses.field(default_factory=time.monotonic)
    created: dict[str, float] = dataclasses.field(default_factory=dict)
    bound: dict[str, float] = dataclasses.field(default_factory=dict)
    running: dict[str, float] = dataclasses.field(default_factory=dict)
    events: int = 0

    def now(self) -> float:
        return time.monotonic() - self.start

    def seen(self, obj: dict[str, Any]) -> None:
        name, at = obj["metadata"]["name"], self.now()
        self.events += 1
        if NODE_LABEL in (obj["metadata"].get("labels") or {}):
            self.bound.setdefault(name, at)
        if running(obj):
            self.running.setdefault(name, at)


def _follow(bench: Bench, timeline: Timeline, version: str, stop: threading.Event) -> None:
    """Feed every watch event of the bench namespace to ``timeline`` until ``stop``; a watch that ends
    (its timeout, a dropped connection) resumes from the last resourceVersion it saw."""
    while not stop.is_set():
        try:
            for event in watch(bench, version, 60):
                version = event["object"]["metadata"]["resourceVersion"]
                timeline.seen(event["object"])
                if stop.is_set():
                    break
        except kubernetes.client.ApiException as exc:
            if exc.status != 410:
                raise
            version = list_version(bench)  # expired: what happened meanwhile shows in the next events


def _progress(timeline: Timeline, total: int, section: str, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        say(
            f"{section}: {len(timeline.created)}/{total} created, {len(timeline.bound)} bound, "
            f"{len(timeline.running)}/{total} Running, {timeline.now():.1f} s"
        )


@contextlib.contextmanager
def watching(bench: Bench, total: int, section: str, every: float = 5.0) -> Iterator[Timeline]:
    """A Timeline fed by a watch thread and reported on stderr every ``every`` seconds while the block
    runs."""
    version = list_version(bench)
    timeline, stop = Timeline(), threading.Event()
    threads = [
        threading.Thread(target=_follow, args=(bench, timeline, version, stop), daemon=True),
        threading.Thread(target=_progress, args=(timeline, total, section, stop, every), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        yield timeline
    finally:
        stop.set()


def create_and_follow(
    bench: Bench, bodies: list[dict[str, Any]], timeline: Timeline, timeout: float = 1200
) -> tuple[float, float]:
    """Create every body back to back, stamping each; seconds until the last create returned and until the
    watch saw every one Running."""
    for body in bodies:
        create(bench, body)
        timeline.created[body["metadata"]["name"]] = timeline.now()
    created = timeline.now()
    names = set(timeline.created)
    deadline = time.monotonic() + timeout
    while not names <= timeline.running.keys():
        if time.monotonic() > deadline:
            missing = sorted(names - timeline.running.keys())
            raise TimeoutError(f"{len(missing)} instances did not reach Running, e.g. {missing[:3]}")
        time.sleep(0.1)
    return created, max(timeline.running[n] for n in names)


def plot(timeline: Timeline, path: pathlib.Path, title: str) -> None:
    """Cumulative created, bound and Running against seconds since the first create (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none needed
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(8, 4.5), dpi=100)
    for label, stamps in (
        ("created", timeline.created),
        ("bound to a node", timeline.bound),
        ("Running", timeline.running),
    ):
        times = sorted(stamps.values())
        axes.step(times, range(1, len(times) + 1), where="post", label=label)
    axes.set_xlabel("seconds since the first create")
    axes.set_ylabel("instances")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
