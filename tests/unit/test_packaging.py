"""The package layout: `kubenova` lives in operator/ without shadowing the stdlib `operator`; the test ground
is the checkout's own package `testground`, never part of the distribution."""

from __future__ import annotations

import concurrent.futures
import pathlib
import shutil
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
    for command in ("controller", "agent", "access", "probe"):
        assert command in out
    # The test ground left the shipped command: it runs from a checkout as `python -m testground`.
    proc = subprocess.run(
        [pathlib.Path(sys.executable).with_name("kubenova"), "dev", "up"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "invalid choice: 'dev'" in proc.stderr, proc.stderr


def test_the_distribution_holds_the_whole_operator_and_no_test_ground(tmp_path: pathlib.Path) -> None:
    """setuptools' own build of the modules, from a copy of the checkout (test ground included, as a
    careless build context would have it): what a wheel and the image get is operator/, all of it."""
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    for name in ("operator", "testground"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=ignore)
    out = tmp_path / "build-lib"
    subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py", "-d", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    built = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert not [name for name in built if "testground" in name], built
    assert (out / "kubenova" / "cli.py").is_file()
    source = {
        "kubenova/" + p.relative_to(REPO / "operator").as_posix()
        for p in (REPO / "operator").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert source - built == set(), "modules of operator/ missing from the distribution"


def test_the_installed_kubenova_has_no_test_ground() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import kubenova.testground"], cwd="/", capture_output=True, text=True
    )
    assert proc.returncode == 1 and "No module named 'kubenova.testground'" in proc.stderr, proc.stderr


def test_the_test_ground_runs_from_the_checkout() -> None:
    """`python -m testground` (what `make demo`, `make down` and CI run) from the checkout's root."""
    out = subprocess.run(
        [sys.executable, "-m", "testground", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("usage: python -m testground")
    for action in ("up", "down", "status", "env", "demo"):
        assert action in out
    up = subprocess.run(
        [sys.executable, "-m", "testground", "up", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in ("--nodes", "--cluster", "--no-kubenova"):
        assert option in up


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
        "expose",
        "diag",
        "vnc",
        "console",
        "port-forward",
        "ssh",
    )
    out = subprocess.run([plugin, "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: kubectl kubenova")

    def help_of(verb: str) -> str:
        return subprocess.run([plugin, verb, "--help"], capture_output=True, text=True, check=True).stdout

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # a Python start-up each: side by side
        for verb, text in zip(verbs, pool.map(help_of, verbs), strict=True):
            assert verb in out
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
