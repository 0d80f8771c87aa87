"""The package layout: `kubenova` lives in operator/ without shadowing the stdlib `operator`."""

from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_import_operator_from_repo_root_is_the_stdlib() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert not out.startswith(str(REPO)), out
    assert pathlib.Path(out).name == "operator.py"
    # A fresh interpreter that has not preloaded the module finds it the same way.
    out = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "import sys; sys.modules.pop('operator', None); import operator; print(operator.__file__)",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert not out.startswith(str(REPO)), out


def test_kubenova_comes_from_the_operator_folder() -> None:
    import kubenova.driver
    import kubenova.handlers

    assert pathlib.Path(kubenova.driver.__file__).parent == REPO / "operator" / "driver"
    assert pathlib.Path(kubenova.handlers.__file__).parent == REPO / "operator" / "handlers"


def test_console_script_lists_its_subcommands() -> None:
    out = subprocess.run(
        [pathlib.Path(sys.executable).with_name("kubenova"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("controller", "agent", "dev"):
        assert command in out


def test_agent_without_node_name_says_how_to_fix_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kubenova.cli", "agent"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert "NODE_NAME" in proc.stderr and "Traceback" not in proc.stderr


def test_the_kubectl_plugin_has_help_for_every_verb() -> None:
    plugin = pathlib.Path(sys.executable).with_name("kubectl-kubenova")
    verbs = (
        "create",
        "delete",
        "start",
        "stop",
        "pause",
        "unpause",
        "suspend",
        "resume",
        "reboot",
        "rescue",
        "unrescue",
        "snapshot",
        "migrate",
        "diag",
        "vnc",
        "console",
    )
    out = subprocess.run([plugin, "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: kubectl kubenova")
    for verb in verbs:
        assert verb in out
        text = subprocess.run([plugin, verb, "--help"], capture_output=True, text=True, check=True).stdout
        assert text.startswith(f"usage: kubectl kubenova {verb}"), verb


def test_the_plugin_without_a_cluster_says_so_in_one_line() -> None:
    plugin = pathlib.Path(sys.executable).with_name("kubectl-kubenova")
    proc = subprocess.run(
        [plugin, "stop", "vm"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "KUBECONFIG": "/nonexistent", "HOME": "/nonexistent"},
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: no cluster to talk to") and proc.stderr.count("\n") == 1, (
        proc.stderr
    )
