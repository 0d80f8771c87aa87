"""Import rules kept by import-linter (configured in pyproject.toml)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_no_import_contract_is_broken() -> None:
    """Only the libvirt driver imports libvirt; controller and agent are independent; the driver is below
    both."""
    # Run by this interpreter: a venv copied from another checkout keeps that checkout's in its scripts'
    # first line, and would check that checkout's kubenova.
    script = pathlib.Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([sys.executable, script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout, proc.stdout
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert len(contracts) >= 4 and f"Contracts: {len(contracts)} kept, 0 broken" in proc.stdout, proc.stdout


#: What a reader can hold in mind: a module fits on a few screens, and a function that defines
#: functions (a closure wiring handlers) stays short enough to see whole.
MODULE_LINES = 450
CLOSURE_LINES = 40


def python_files() -> list[pathlib.Path]:
    return sorted(p for folder in ("operator", "testground") for p in (REPO / folder).rglob("*.py"))


def test_no_module_is_longer_than_a_reader_can_hold() -> None:
    long = {
        str(p.relative_to(REPO)): n
        for p in python_files()
        if (n := len(p.read_text().splitlines())) > MODULE_LINES
    }
    assert not long, f"modules over {MODULE_LINES} lines: {long}"


def test_no_long_function_holds_nested_functions() -> None:
    found = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            inner = [
                n.name
                for n in ast.walk(node)
                if n is not node and isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            ]
            span = (node.end_lineno or node.lineno) - node.lineno + 1
            if inner and span > CLOSURE_LINES:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({span} lines: {inner})")
    assert not found, f"functions over {CLOSURE_LINES} lines that define functions:\n" + "\n".join(found)
