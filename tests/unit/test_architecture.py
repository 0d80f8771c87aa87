"""Import rules kept by import-linter (configured in pyproject.toml)."""
from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_only_the_libvirt_driver_imports_libvirt() -> None:
    proc = subprocess.run([pathlib.Path(sys.executable).with_name("lint-imports")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout
