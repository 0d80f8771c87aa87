"""`kubectl kubenova console` through the kube-apiserver, against a real WebSocket server standing in for
it: bytes both ways with piped stdin, the escape key, `--log`, the close codes in words, a refused upgrade
printed as kubectl prints it, and the kubeconfig's TLS trust and bearer token on the wire."""

from __future__ import annotations

import os
import pathlib
import ssl
import sys
import termios

import kubernetes
import pytest
from aiohttp import WSMsgType, web

from kubenova.plugin import access, cli, stream, terminal
from tests.unit.plugin_apiserver import PATH, Apiserver, kubeconfig, self_signed

FORBIDDEN = (
    'virtualinstances.compute.kubenova.io "web" is forbidden: User "alice" cannot get resource '
    '"virtualinstances/console" in API group "subresources.compute.kubenova.io" in the namespace "team"'
)


def stdin_with(monkeypatch: pytest.MonkeyPatch, data: bytes, close: bool = True) -> int:
    """Piped stdin holding ``data`` (ended unless ``close`` is False); returns the write end."""
    read, write = os.pipe()
    os.write(write, data)
    if close:
        os.close(write)
    monkeypatch.setattr(sys, "stdin", os.fdopen(read, "rb", buffering=0))
    return write


def kubenova(apiserver: Apiserver, tmp_path: pathlib.Path, *argv: str) -> int:
    return cli.main(["--kubeconfig", kubeconfig(tmp_path, apiserver.url, "a-token"), *argv])


async def echo_one_line(request: web.Request, ws: web.WebSocketResponse) -> None:
    """Echo as a shell at a prompt would, and end the session normally after the first line."""
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            await ws.send_bytes(b"echo:" + msg.data)
            if b"\n" in msg.data:
                await ws.close(code=1000)


def test_console_sends_piped_stdin_to_the_guest_and_prints_its_answer(
    apiserver: Apiserver,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    apiserver.script = echo_one_line
    stdin_with(monkeypatch, b"uname\n")
    assert kubenova(apiserver, tmp_path, "console", "web") == 0
    out, err = capsysbinary.readouterr()
    assert out == b"echo:uname\n"
    assert err == b"Connected to web's serial console; escape with Ctrl-]\n"
    seen = apiserver.seen[0].settled()
    assert seen.path == f"{PATH}/console" and seen.query == {}
    assert seen.headers["Authorization"] == "Bearer a-token"
    assert seen.received == b"uname\n"


def test_the_escape_key_ends_the_session_and_what_follows_it_is_not_sent(
    apiserver: Apiserver,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    write = stdin_with(monkeypatch, b"ls\n\x1dnot for the guest", close=False)  # no end of input either
    try:
        assert kubenova(apiserver, tmp_path, "console", "web") == 0
    finally:
        os.close(write)
    assert capsysbinary.readouterr().out == b"ls\n"  # the guest's answer sent before the close still shows
    seen = apiserver.seen[0].settled()
    assert seen.received == b"ls\n" and seen.close_code == 1000


def test_log_prints_the_persistent_boot_log_and_exits(
    apiserver: Apiserver, tmp_path: pathlib.Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    async def log(request: web.Request, ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(b"[    0.000000] Linux version 6.1\r\n")
        await ws.send_bytes(b"KUBENOVA-CLOUD-BOOTED\r\n")
        await ws.close(code=1000)

    apiserver.script = log
    assert kubenova(apiserver, tmp_path, "console", "web", "--log") == 0
    assert capsysbinary.readouterr().out == b"[    0.000000] Linux version 6.1\r\nKUBENOVA-CLOUD-BOOTED\r\n"
    (seen,) = apiserver.seen
    assert seen.path == f"{PATH}/console" and seen.query == {"log": "true"}


def test_a_newer_console_taking_over_ends_this_one_with_a_message(
    apiserver: Apiserver,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def taken_over(request: web.Request, ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(b"login: ")
        await ws.close(code=4001, message=b"a newer console")

    apiserver.script = taken_over
    write = stdin_with(monkeypatch, b"", close=False)
    try:
        assert kubenova(apiserver, tmp_path, "console", "web") == 1
    finally:
        os.close(write)
    out, err = capsys.readouterr()
    assert out == "login: "
    assert err.splitlines()[-1] == "error: another console took over web's serial console"


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (stream.IDLE, "the session was idle too long"),
        (stream.GONE, "web stopped or went away"),
        (stream.NODE_ERROR, "the node could not serve web: qemu said no"),
        (stream.DROPPED, "the connection to the apiserver dropped"),
    ],
)
def test_each_close_code_is_said_in_words(code: int, said: str) -> None:
    with pytest.raises(access.Refused, match=said):
        access.ended("web", stream.Closed(code, "qemu said no"))
    access.ended("web", stream.Closed(stream.NORMAL))


@pytest.mark.parametrize(
    ("status", "body", "said"),
    [
        (403, {"kind": "Status", "reason": "Forbidden", "code": 403, "message": FORBIDDEN},
         f"Error from server (Forbidden): {FORBIDDEN}"),
        (404, {"kind": "Status", "reason": "NotFound", "message": 'virtualinstances "web" not found'},
         'Error from server (NotFound): virtualinstances "web" not found'),
        (409, {"kind": "Status", "reason": "Conflict", "message": "web is not running"},
         "Error from server (Conflict): web is not running"),
        (401, {"kind": "Status", "reason": "Unauthorized", "message": "Unauthorized"},
         "error: You must be logged in to the server (Unauthorized)"),
    ],
)  # fmt: skip
def test_a_refused_upgrade_is_printed_as_kubectl_prints_it(
    apiserver: Apiserver,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    status: int,
    body: dict[str, object],
    said: str,
) -> None:
    apiserver.refuse = (status, body)
    assert kubenova(apiserver, tmp_path, "console", "web", "--log") == 1
    assert capsys.readouterr().err == said + "\n"


def test_tls_with_the_kubeconfigs_ca_carries_the_bearer_token(
    tmp_path: pathlib.Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    cert, context = self_signed(tmp_path)
    server = Apiserver(tls=context)

    async def log(request: web.Request, ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(b"over TLS\n")
        await ws.close()

    server.script = log
    try:
        config = kubeconfig(tmp_path, server.url, "tls-token", ca=cert)
        assert cli.main(["--kubeconfig", config, "-n", "other", "console", "web", "--log"]) == 0
    finally:
        server.stop()
    assert capsysbinary.readouterr().out == b"over TLS\n"
    (seen,) = server.seen
    assert seen.headers["Authorization"] == "Bearer tls-token"
    assert seen.path.startswith("/apis/subresources.compute.kubenova.io/v1alpha1/namespaces/other/")


def test_an_untrusted_server_certificate_is_refused_in_one_line(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, context = self_signed(tmp_path)
    server = Apiserver(tls=context)
    try:
        assert (
            cli.main(["--kubeconfig", kubeconfig(tmp_path, server.url, "t"), "console", "web", "--log"]) == 1
        )
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: cannot reach the apiserver at {server.url}: ")
        and "CERTIFICATE" in err.upper()
    )
    assert server.seen == []


def test_raw_mode_is_undone_however_the_session_ends() -> None:
    leader, follower = os.openpty()
    try:
        before = termios.tcgetattr(follower)
        with pytest.raises(RuntimeError), terminal.raw(follower) as is_terminal:
            assert is_terminal
            assert not termios.tcgetattr(follower)[3] & termios.ECHO
            raise RuntimeError("the connection broke")
        assert termios.tcgetattr(follower) == before
    finally:
        os.close(leader)
        os.close(follower)
    read, write = os.pipe()
    with terminal.raw(read) as is_terminal:
        assert not is_terminal
    os.close(read)
    os.close(write)


def test_follow_prints_the_log_then_attaches(
    apiserver: Apiserver,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    async def log_or_console(request: web.Request, ws: web.WebSocketResponse) -> None:
        if request.query.get("log") == "true":
            await ws.send_bytes(b"boot log\n")
            await ws.close()
        else:
            await echo_one_line(request, ws)

    apiserver.script = log_or_console
    stdin_with(monkeypatch, b"id\n")
    assert kubenova(apiserver, tmp_path, "console", "web", "--log", "-f") == 0
    assert capsysbinary.readouterr().out == b"boot log\necho:id\n"
    assert [s.query for s in apiserver.seen] == [{"log": "true"}, {}]


def test_the_kubeconfigs_tls_client_certificate_and_proxy_reach_the_websocket() -> None:
    configuration = kubernetes.client.Configuration()
    configuration.host = "https://api.example:6443/k8s/clusters/c-1"
    configuration.verify_ssl = False
    configuration.cert_file, configuration.key_file = "/tmp/cert.pem", "/tmp/key.pem"
    configuration.api_key["authorization"] = "Bearer old"
    configuration.refresh_api_key_hook = lambda c: c.api_key.update(authorization="Bearer fresh")
    configuration.proxy = "http://me:p%40ss@proxy.example:3128"
    configuration.no_proxy = "localhost, .internal"
    options = stream.connect_options(configuration)
    assert options["header"] == ["Authorization: Bearer fresh"]  # an exec plugin's token, refreshed
    assert options["sslopt"] == {
        "cert_reqs": ssl.CERT_NONE,
        "check_hostname": False,
        "certfile": "/tmp/cert.pem",
        "keyfile": "/tmp/key.pem",
    }
    assert (options["http_proxy_host"], options["http_proxy_port"], options["proxy_type"]) == (
        "proxy.example",
        3128,
        "http",
    )
    assert options["http_proxy_auth"] == ("me", "p@ss")
    assert options["http_no_proxy"] == ["localhost", ".internal"]
    endpoint = stream.Endpoint(configuration, "team", "web")
    assert endpoint.url("portforward", {"port": "22"}) == (
        "wss://api.example:6443/k8s/clusters/c-1/apis/subresources.compute.kubenova.io/v1alpha1/namespaces/"
        "team/virtualinstances/web/portforward?port=22"
    )
