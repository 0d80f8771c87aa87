"""The fault points the fault tests arm: a process stops at an armed point and says so with its pid."""

from __future__ import annotations

import os
import pathlib
import threading

import pytest

from kubenova import faults
from tests.helpers import eventually


def test_an_armed_point_holds_until_go_and_its_reached_file_is_never_read_empty(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(faults, "_DIR", str(tmp_path))
    (tmp_path / "step.arm").write_text("step\n")
    reached = tmp_path / "step.reached"
    seen: list[str] = []
    held = threading.Thread(target=faults.point, args=("step",))
    held.start()
    eventually(lambda: reached.exists() and seen.append(reached.read_text()) is None, 10, 0.0001, "reached")
    assert seen[0] == f"{os.getpid()}\nstep\n"  # whole at its first sight
    assert held.is_alive()
    (tmp_path / "step.go").write_text("go\n")
    held.join(10)
    assert not held.is_alive()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step.reached"]
    faults.point("step")  # no longer armed: goes straight on
