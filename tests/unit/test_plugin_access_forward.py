"""`kubectl kubenova port-forward`, `ssh` and `vnc` through the kube-apiserver, against a real WebSocket
server standing in for it: each local TCP connection gets its own stream, bytes go both ways, a refused
stream is one line and the forward goes on, and port specs are checked before anything listens."""

from __future__ import annotations

import pathlib
import re
import socket
import threading
from collections.abc import Sequence

import pytest

from kubenova.plugin import access, cli, stream
from kubenova.plugin.verbs import Plugin, Refused
from tests.unit.plugin_apiserver import PATH, Apiserver, kubeconfig


def endpoint(apiserver: Apiserver, tmp_path: pathlib.Path, name: str = "web") -> stream.Endpoint:
    plugin = Plugin(None, 10, kubeconfig(tmp_path, apiserver.url, "a-token"))
    return stream.Endpoint(plugin.configuration, plugin.namespace, name)


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection to the local ``port``, end our side, read all that comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        answer = b""
        while len(answer) < len(data) and (chunk := conn.recv(65536)):
            answer += chunk
        return answer


class Forwarding:
    """port_forward in a thread, with what it said, until the test ends."""

    def __init__(self, target: stream.Endpoint, specs: Sequence[str]) -> None:
        self.lines: list[str] = []
        self.said = threading.Condition()
        self.stop = threading.Event()
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(target, specs), daemon=True)
        self.thread.start()

    def _run(self, target: stream.Endpoint, specs: Sequence[str]) -> None:
        try:
            access.port_forward(target, specs, self._say, self.stop)
        except BaseException as exc:  # handed to the test
            self.failure.append(exc)

    def _say(self, line: str) -> None:
        with self.said:
            self.lines.append(line)
            self.said.notify_all()

    def ports(self, count: int) -> list[tuple[int, int]]:
        """(local, remote) of each `Forwarding from` line, once all ``count`` are said."""
        with self.said:
            self.said.wait_for(lambda: len(self.lines) >= count or not self.thread.is_alive(), timeout=10)
        found = [re.fullmatch(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)", line) for line in self.lines]
        return [(int(m[1]), int(m[2])) for m in found if m]

    def end(self) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.mark.parametrize(
    ("specs", "pairs"),
    [
        (["2222:22"], [(2222, 22)]),
        (["8080"], [(8080, 8080)]),
        ([":22", "0:80"], [(0, 22), (0, 80)]),
    ],
)
def test_port_specs_name_a_local_and_a_remote_port(specs: list[str], pairs: list[tuple[int, int]]) -> None:
    assert access.parse_ports(specs) == pairs


@pytest.mark.parametrize(
    "spec", ["", "22:", "a:22", "2222:ssh", "22:0", "70000:22", "22:70000", "1:2:3", "-1"]
)
def test_a_bad_port_spec_is_refused_before_anything_listens(spec: str) -> None:
    with pytest.raises(Refused, match="port"):
        access.parse_ports([spec])


def test_port_forward_carries_each_local_connection_over_its_own_stream(
    apiserver: Apiserver, tmp_path: pathlib.Path
) -> None:
    forwarding = Forwarding(endpoint(apiserver, tmp_path), [":22", ":80"])
    try:
        (ssh_port, remote_ssh), (http_port, remote_http) = forwarding.ports(2)
        assert (remote_ssh, remote_http) == (22, 80) and ssh_port != http_port
        assert exchange(ssh_port, b"SSH-2.0-OpenSSH_9.2\r\n") == b"SSH-2.0-OpenSSH_9.2\r\n"
        assert exchange(http_port, b"GET / HTTP/1.0\r\n\r\n" * 5000) == b"GET / HTTP/1.0\r\n\r\n" * 5000
    finally:
        forwarding.end()
    assert not forwarding.failure
    assert [(s.path, s.query) for s in apiserver.seen] == [
        (f"{PATH}/portforward", {"port": "22"}),
        (f"{PATH}/portforward", {"port": "80"}),
    ]
    assert all(s.headers["Authorization"] == "Bearer a-token" for s in apiserver.seen)
    assert f"Handling connection for {ssh_port}" in forwarding.lines


def test_a_refused_stream_closes_that_connection_and_the_forward_goes_on(
    apiserver: Apiserver, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    forwarding = Forwarding(endpoint(apiserver, tmp_path), [":22"])
    try:
        ((local, _),) = forwarding.ports(1)
        apiserver.refuse = (
            403,
            {"kind": "Status", "reason": "Forbidden", "message": "no portforward for you"},
        )
        assert exchange(local, b"hello") == b""
        apiserver.refuse = None
        assert exchange(local, b"hello") == b"hello"
    finally:
        forwarding.end()
    assert "Error from server (Forbidden): no portforward for you\n" in capsys.readouterr().err


def test_a_taken_local_port_is_refused_in_one_line(apiserver: Apiserver, tmp_path: pathlib.Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        forwarding = Forwarding(endpoint(apiserver, tmp_path), [f"{taken.getsockname()[1]}:22"])
        forwarding.thread.join(10)
    (failure,) = forwarding.failure
    assert isinstance(failure, Refused) and str(failure).startswith("cannot listen on 127.0.0.1:")


def test_ssh_runs_over_a_forward_to_the_guests_port_and_exits_as_ssh_does(
    apiserver: Apiserver, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[list[str]] = []

    def ssh(argv: list[str]) -> int:
        ran.append(argv)
        assert exchange(int(argv[argv.index("-p") + 1]), b"SSH-2.0-test\r\n") == b"SSH-2.0-test\r\n"
        return 7

    monkeypatch.setattr(access.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(access.subprocess, "call", ssh)
    config = kubeconfig(tmp_path, apiserver.url, "a-token")
    argv = [
        "--kubeconfig",
        config,
        "ssh",
        "web",
        "-l",
        "debian",
        "-p",
        "2222",
        "-c",
        "uptime",
        "--",
        "-i",
        "key",
    ]
    assert cli.main(argv) == 7
    ((binary, flag, port, *rest),) = ran
    assert (binary, flag) == ("/usr/bin/ssh", "-p") and int(port) > 0
    assert rest == ["-o", "HostKeyAlias=web.team", "-i", "key", "debian@127.0.0.1", "uptime"]
    assert [(s.path, s.query) for s in apiserver.seen] == [(f"{PATH}/portforward", {"port": "2222"})]


@pytest.mark.parametrize(
    ("viewer", "no_viewer", "installed", "argv"),
    [
        (None, True, ["remote-viewer"], None),
        (None, False, [], None),
        (None, False, ["remote-viewer", "vncviewer"], ["/bin/remote-viewer", "vnc://127.0.0.1:5999"]),
        (None, False, ["vncviewer"], ["/bin/vncviewer", "127.0.0.1::5999"]),
        ("gvncviewer -v", False, [], ["gvncviewer", "-v", "vnc://127.0.0.1:5999"]),
        ("krdc vnc://{host}:{port}", False, [], ["krdc", "vnc://127.0.0.1:5999"]),
    ],
)
def test_vnc_launches_the_viewer_asked_for_or_one_installed(
    monkeypatch: pytest.MonkeyPatch,
    viewer: str | None,
    no_viewer: bool,
    installed: list[str],
    argv: list[str] | None,
) -> None:
    monkeypatch.setattr(access.shutil, "which", lambda name: f"/bin/{name}" if name in installed else None)
    assert access.viewer_command(viewer, no_viewer, 5999) == argv


def test_vnc_forwards_the_viewers_connection_and_ends_with_the_viewer(
    apiserver: Apiserver,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    viewed: list[bytes] = []

    def viewer(argv: list[str]) -> int:
        viewed.append(exchange(int(argv[-1].rsplit(":", 1)[1]), b"RFB 003.008\n"))
        return 0

    monkeypatch.setattr(access.subprocess, "call", viewer)
    config = kubeconfig(tmp_path, apiserver.url, "a-token")
    assert cli.main(["--kubeconfig", config, "vnc", "desk", "--viewer", "myviewer"]) == 0
    assert viewed == [b"RFB 003.008\n"]
    assert re.fullmatch(r"vnc://127\.0\.0\.1:\d+ \(Ctrl-C to stop\)\n", capsys.readouterr().out)
    vnc_path = PATH.replace("/web", "/desk") + "/vnc"
    assert [s.path for s in apiserver.seen if s.path.endswith("/vnc")] == [vnc_path]
