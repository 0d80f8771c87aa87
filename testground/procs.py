"""Background processes of the test ground, tracked by pid files so `down` stops only ours."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence


class TestGroundError(Exception):
    """A set-up failure with a one-line cause and fix, shown without a traceback."""

    __test__ = False  # not a pytest test class, despite the name


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the test ground keeps its state (per run) and its caches (across runs)."""

    state: pathlib.Path
    cache: pathlib.Path

    @classmethod
    def default(cls) -> Layout:
        home = pathlib.Path.home()
        state = os.environ.get("KUBENOVA_DEV_DIR", str(home / ".kubenova" / "dev"))
        cache = os.environ.get("KUBENOVA_CACHE", str(home / ".cache" / "kubenova"))
        return cls(pathlib.Path(state), pathlib.Path(cache))

    @property
    def kubeconfig(self) -> pathlib.Path:
        return self.state / "kubeconfig"

    def pidfile(self, name: str) -> pathlib.Path:
        return self.state / "pids" / f"{name}.pid"

    def logfile(self, name: str) -> pathlib.Path:
        return self.state / "logs" / f"{name}.log"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is dead for our purposes
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def running_pid(layout: Layout, name: str) -> int | None:
    """The pid of our process `name`, if it still runs (guarding against pid reuse)."""
    try:
        pid_s, marker = layout.pidfile(name).read_text().split("\n", 1)
        pid = int(pid_s)
    except (FileNotFoundError, ValueError):
        return None
    if pid_alive(pid) and marker.strip() in _cmdline(pid):
        return pid
    return None


def started_as(layout: Layout, name: str) -> tuple[list[str], str] | None:
    """How our running process ``name`` was started: its argv and its marker (None if it does not run)."""
    pid = running_pid(layout, name)
    try:
        argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1] if pid else []
        marker = layout.pidfile(name).read_text().split("\n")[1]
    except (OSError, IndexError):  # gone meanwhile
        return None
    return ([arg.decode() for arg in argv], marker) if argv else None


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
    """Whether something listens on the loopback port (a server we started is up)."""
    return not _port_free(port)


def check_port_free(port: int, what: str, env_var: str, grace: float = 10.0) -> None:
    """Fail clearly when another process holds the port; a just-killed one gets ``grace`` to let go of it.

    A killed multi-threaded server shows as a zombie before its last thread has closed its sockets.
    """
    deadline = time.monotonic() + grace
    while not _port_free(port):
        if time.monotonic() > deadline:
            raise TestGroundError(
                f"port 127.0.0.1:{port} for {what} is already in use by another process; "
                f"stop it or choose another port with {env_var}=<port>"
            )
        time.sleep(0.1)


def start(
    layout: Layout, name: str, argv: Sequence[str], marker: str, env: Mapping[str, str] | None = None
) -> int:
    """Start `argv` detached, logging to logs/<name>.log; `marker` identifies it in /proc later."""
    log = layout.logfile(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    layout.pidfile(name).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )
    layout.pidfile(name).write_text(f"{proc.pid}\n{marker}\n")
    return proc.pid


def stop(layout: Layout, name: str, timeout: float = 10.0) -> bool:
    """Stop our process `name` (TERM, then KILL); returns whether one was running."""
    pid = running_pid(layout, name)
    layout.pidfile(name).unlink(missing_ok=True)
    if pid is None:
        return False
    terminate(pid, timeout)
    return True


def terminate(pid: int, timeout: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(check: Callable[[], bool], timeout: float, what: str, log: pathlib.Path | None = None) -> None:
    """Poll `check` until it is true; on timeout name what did not come up and where to look."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    hint = f"; see {log}" if log else ""
    raise TestGroundError(f"{what} did not become ready within {timeout:.0f}s{hint}")


def run(argv: Sequence[str], what: str, fix: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a set-up command; a failure becomes one line naming the cause and the fix."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError:
        raise TestGroundError(f"{what}: '{argv[0]}' is not installed; {fix}") from None
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise TestGroundError(f"{what} failed: {last[0]}; {fix}")
    return proc


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (FileNotFoundError once it is gone)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
