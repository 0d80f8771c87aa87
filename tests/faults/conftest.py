"""Collects the fault matrix's outcomes and prints them as a table at the end of the run."""

from __future__ import annotations

from typing import Any

#: (step, component) -> "N s" from the kill to convergence, or "failed"
RESULTS: dict[tuple[str, str], str] = {}
#: One line per crash point of test_migration_kills.py.
KILL_RESULTS: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in KILL_RESULTS:
        terminalreporter.write_line(line)
    if not RESULTS:
        return
    from tests.faults.chaos import COMPONENTS

    steps = list(dict.fromkeys(step for step, _ in RESULTS))
    write = terminalreporter.write_line
    write("")
    write("fault matrix: seconds from the kill -9 to convergence (restarting the killed component included)")
    write("| step | " + " | ".join(COMPONENTS) + " |")
    write("| --- |" + " --- |" * len(COMPONENTS))
    for step in steps:
        write(f"| {step} | " + " | ".join(RESULTS.get((step, c), "not run") for c in COMPONENTS) + " |")
