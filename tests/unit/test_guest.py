"""The test guest's inputs that can go wrong without a boot: the hooks a test puts on the kernel command line,
the shell text of /init and of its DHCP hook (run here by the same busybox the guest runs), and the initramfs
that carries them. Booting it is minutes of TCG per case; a typo here would read as a guest that stays
silent, which a test would take for a firewall dropping traffic."""

from __future__ import annotations

import gzip
import os
import pathlib
import re
import shutil
import subprocess

import pytest

from testground import guest, guest_init


def _busybox() -> str:
    assert guest.BUSYBOX.exists(), f"{guest.BUSYBOX} is missing: run hack/install-deps.sh (busybox-static)"
    return str(guest.BUSYBOX)


@pytest.mark.parametrize(
    ("url", "arg"),
    [
        ("10.0.2.2:8000", "kubenova.probe=10.0.2.2:8000"),
        ("http://192.168.122.15:80/", "kubenova.probe=192.168.122.15:80"),
        ("http://10.0.0.1:65535", "kubenova.probe=10.0.0.1:65535"),
        ("0.0.0.0:1", "kubenova.probe=0.0.0.0:1"),
    ],
)
def test_probe_hook_takes_an_ipv4_address_and_a_port(url: str, arg: str) -> None:
    assert guest.probe_hook(url) == arg


@pytest.mark.parametrize(
    "url",
    [
        "",
        "10.0.2.2",
        "10.0.2.2:",
        "10.0.2.2:0",
        "10.0.2.2:080",
        "10.0.2.2:65536",
        "256.0.2.2:80",
        "010.0.2.2:80",
        "10.0.2:80",
        "host.example:80",
        "[::1]:80",
        "https://10.0.2.2:443/",
        "http://10.0.2.2:80/path",
        "10.0.2.2:80 kubenova.role=rescue",
        "10.0.2.2:80\n",
    ],
)
def test_probe_hook_refuses_anything_else(url: str) -> None:
    with pytest.raises(ValueError, match="kubenova.probe"):
        guest.probe_hook(url)


def test_the_other_hooks_still_refuse_what_the_guest_would_ignore() -> None:
    assert guest.write_hook("vdb", "abc-1") == "kubenova.write=vdb:abc-1"
    assert guest.spoof_hook("52:54:00:aa:bb:cc") == "kubenova.spoof=52:54:00:aa:bb:cc"
    assert guest.fill_hook("vdc") == "kubenova.fill=vdc"
    assert guest.dirty_hook(64) == "kubenova.dirty=64"
    for bad in (
        lambda: guest.write_hook("vd b", "x"),
        lambda: guest.write_hook("vdb", "a b"),
        lambda: guest.spoof_hook("52:54:00:AA:BB:CC"),
        lambda: guest.fill_hook("../vda"),
        lambda: guest.dirty_hook(0),
    ):
        with pytest.raises(ValueError):
            bad()


def _guest_side_probe(value: str) -> str:
    """What /init keeps of ``kubenova.probe=<value>``: its own check, run by busybox as the guest does."""
    check = next(line for line in guest.INIT.splitlines() if line.startswith('case "$probe" in'))
    script = f'probe="$1"\n{check}\nprintf %s "$probe"'
    return subprocess.run(
        [_busybox(), "sh", "-c", script, "sh", value], capture_output=True, text=True, check=True
    ).stdout


def test_the_guest_keeps_every_probe_the_hook_makes_and_drops_garbage() -> None:
    for url in ("10.0.2.2:8000", "http://192.168.122.15:80/"):
        value = guest.probe_hook(url).removeprefix("kubenova.probe=")
        assert _guest_side_probe(value) == value
    for garbage in ("10.0.2.2", "x:80", "10.0.2.2:80;reboot", "$(reboot):1"):
        assert _guest_side_probe(garbage) == ""


def test_init_and_dhcp_hook_are_valid_shell_for_busybox() -> None:
    """The scripts are f-strings: a single brace too many or too few shows up here, not in a silent guest."""
    for text in (guest.INIT, guest_init.DHCP_SCRIPT):
        proc = subprocess.run([_busybox(), "sh", "-n"], input=text, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "{" + "{" not in text and "}" + "}" not in text


def test_init_starts_dhcp_in_the_background_with_our_hook_and_the_console_as_its_stdout() -> None:
    (line,) = [line.strip() for line in guest.INIT.splitlines() if line.strip().startswith("udhcpc ")]
    argv = line.split()
    assert argv[-1] == "&", "udhcpc must not block the boot"
    assert "-f" in argv, "without -f udhcpc daemonizes once bound and its hook loses the console"
    assert argv[argv.index("-s") + 1] == guest_init.DHCP_SCRIPT_PATH
    assert argv[argv.index("-i") + 1] == "eth0"
    # -n would give up on a network without DHCP, -q after the first lease (no renewals), -R drop it on exit.
    assert not {"-n", "-q", "-b", "-R"} & set(argv)
    assert "2>/dev/null" in argv and ">/dev/null" not in argv and "1>/dev/null" not in argv


def test_init_serves_the_mac_and_probes_with_the_markers() -> None:
    init = guest.INIT
    assert f'echo "{guest.HTTP} $mac" >/www/index.html' in init
    assert f"httpd -p {guest.HTTP_PORT} -h /www" in init
    assert f'echo "{guest.TCP} $mac" >' in init and f"nc -ll -p {guest.TCP_PORT} -e /bin/cat" in init
    assert f'echo "{guest.PROBE} ok ' in init and f'echo "{guest.PROBE} fail"' in init
    assert 'timeout 1 wget -q -O - "http://$probe/"' in init
    assert f"until [ -s {guest_init.LEASES}/eth0 ]" in init
    # The link-local address and the peer pings of the existing tests stay, and come before DHCP starts.
    assert init.index(f"ip addr add {guest.GUEST_ADDRESS} dev eth0") < init.index("udhcpc ")
    assert init.index(f"ping -c 5 -W 1 {guest.PEER_ADDRESS}") < init.index("udhcpc ")
    # Everything new comes after the boot marker, so the marker is not any later than before.
    assert init.index(f'echo "{guest.BOOT_MARKER} ') < init.index("mkdir -p /www")
    assert guest.DHCP == "kubenova-dhcp" and guest.PROBE == "kubenova-probe"
    assert (guest.HTTP, guest.HTTP_PORT) == ("kubenova-http", 80)
    assert (guest.TCP, guest.TCP_PORT) == ("kubenova-tcp", 7000)


def _run_hook(tmp_path: pathlib.Path, event: str, **lease: str) -> tuple[str, list[str]]:
    """Run DHCP_SCRIPT as udhcpc would, with the lease folder moved under tmp_path and ``ip`` a shell function
    that only records its arguments. Returns its stdout (the console) and the ip commands it ran.

    A function, not a fake ``ip`` on PATH: busybox sh runs its own applets before searching PATH, so a fake
    there would be passed over and the real ``ip`` would change this machine's addresses and routes.
    """
    leases, calls = tmp_path / "leases", tmp_path / "ip-calls"
    leases.mkdir(exist_ok=True)
    calls.unlink(missing_ok=True)
    hook = guest_init.DHCP_SCRIPT.replace(guest_init.LEASES, str(leases))
    script = f'ip() {{ echo "$*" >>{calls}; }}\n{hook}'
    env = {"PATH": "/nonexistent", "interface": "eth0", **lease}
    out = subprocess.run(
        [_busybox(), "sh", "-c", script, "dhcp.sh", event],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out, calls.read_text().splitlines() if calls.exists() else []


def test_dhcp_hook_adds_the_lease_and_route_next_to_the_link_local_address(tmp_path: pathlib.Path) -> None:
    out, ip = _run_hook(tmp_path, "deconfig")
    assert (out, ip) == ("", []), "the first deconfig must leave eth0 (and its link-local address) alone"
    lease = {"ip": "10.0.2.15", "mask": "24", "router": "10.0.2.2 10.0.2.3", "subnet": "255.255.255.0"}
    out, ip = _run_hook(tmp_path, "bound", **lease)
    assert out == f"{guest.DHCP} eth0 10.0.2.15/24\n"
    assert ip == ["addr replace 10.0.2.15/24 dev eth0", "route replace default via 10.0.2.2 dev eth0"]
    out, ip = _run_hook(tmp_path, "renew", **lease)
    assert out == f"{guest.DHCP} eth0 10.0.2.15/24\n" and "addr del" not in " ".join(ip)
    out, ip = _run_hook(tmp_path, "renew", **{**lease, "ip": "10.0.2.16"})
    assert out == f"{guest.DHCP} eth0 10.0.2.16/24\n"
    assert ip[:2] == ["addr del 10.0.2.15/24 dev eth0", "addr replace 10.0.2.16/24 dev eth0"]
    out, ip = _run_hook(tmp_path, "deconfig")
    assert (out, ip) == ("", ["addr del 10.0.2.16/24 dev eth0"])
    assert not any("flush" in call or guest.GUEST_ADDRESS in call for call in ip)


def test_dhcp_hook_without_a_subnet_or_router_takes_a_host_address(tmp_path: pathlib.Path) -> None:
    out, ip = _run_hook(tmp_path, "bound", ip="192.0.2.9")
    assert out == f"{guest.DHCP} eth0 192.0.2.9/32\n" and ip == ["addr replace 192.0.2.9/32 dev eth0"]
    for event in ("leasefail", "nak"):
        assert _run_hook(tmp_path, event) == ("", [])


def test_initrd_holds_init_and_the_dhcp_hook_executable(tmp_path: pathlib.Path) -> None:
    assert shutil.which("cpio"), "cpio is missing: run hack/install-deps.sh"
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "order").write_text("")
    initrd = tmp_path / "initrd.img"
    guest._build_initrd(initrd, modules)
    unpacked = tmp_path / "root"
    unpacked.mkdir()
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet"], cwd=unpacked, input=gzip.decompress(initrd.read_bytes()), check=True
    )
    hook = unpacked / guest_init.DHCP_SCRIPT_PATH.lstrip("/")
    assert hook.read_text() == guest_init.DHCP_SCRIPT and os.access(hook, os.X_OK)
    assert (unpacked / "init").read_text() == guest.INIT and os.access(unpacked / "init", os.X_OK)
    assert re.match(r"#!/bin/sh\n", guest_init.DHCP_SCRIPT), "the guest's busybox --install puts sh in /bin"
