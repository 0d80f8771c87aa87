"""Import rules kept by import-linter (configured in pyproject.toml)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_no_import_contract_is_broken() -> None:
    """Only the libvirt driver imports libvirt; controller and agent are independent; the driver is below
    both."""
    proc = subprocess.run(
        [pathlib.Path(sys.executable).with_name("lint-imports")], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout, proc.stdout
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert len(contracts) >= 4 and f"Contracts: {len(contracts)} kept, 0 broken" in proc.stdout, proc.stdout
