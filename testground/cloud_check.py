"""Boot the cloud image in plain QEMU (no libvirt, no test ground) and check what kubenova relies on.

The guest gets what kubenova's libvirt driver would give it, made by kubenova's own code: a NoCloud config
drive (kubenova.driver.cloudinit + configdrive) with user-data, vendor-data (an injected file and an admin
password) and a version 2 network-config, a virtio-serial port org.qemu.guest_agent.0, a virtio NIC. It
then checks, timing each from QEMU's start: the runcmd marker on the serial console, the guest agent
(guest-ping, guest-get-osinfo), ssh with the key from user-data (default user and root), the static address
from network-config (the only one ssh is forwarded to), the injected file and the grown root filesystem.

Run it as ``python -m testground.cloud_image --check`` (root; builds the image first when needed).
"""

from __future__ import annotations

import json
import pathlib
import shlex
import socket
import subprocess
import tempfile
import time
import uuid

from kubenova.driver import cloudinit
from kubenova.driver.libvirt import configdrive
from kubenova.driver.types import InjectedFile, InstanceSpec
from testground import cloud_image, procs
from testground.procs import Layout, TestGroundError

RUNCMD_MARKER = "KUBENOVA-CLOUD-CHECK-RUNCMD"
GUEST_ADDRESS = "10.0.2.20"  # QEMU user networking's subnet; DHCP would hand out 10.0.2.15
MAC = "52:54:00:6b:6e:01"
INJECTED = ("/etc/kubenova-injected", b"injected by kubenova\n")
HOSTNAME = "cloud-check"
FIX = "apt-get install openssh-client qemu-utils"
ROOT_GIB = 2  # the overlay is larger than the image: cloud-init's growpart and resizefs must use it

USER_DATA = f"""#cloud-config
disable_root: false
ssh_authorized_keys: [{{key}}]
runcmd:
  - echo "{RUNCMD_MARKER} $(hostname)" >/dev/console
"""
NETWORK_CONFIG = f"""version: 2
ethernets:
  eth0:
    addresses: [{GUEST_ADDRESS}/24]
    routes: [{{to: 0.0.0.0/0, via: 10.0.2.2}}]
    nameservers: {{addresses: [10.0.2.3]}}
"""


class _Agent:
    """A client of qemu-ga on QEMU's unix socket: guest-sync first, since requests written while no agent
    listened stay queued and their answers come later."""

    def __init__(self, path: pathlib.Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.buf = b""
        self.sent: set[int] = set()
        self.next_sync = 0.0

    def call(self, command: str, timeout: float, **arguments: object) -> object:
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(command)
                self.sock.settimeout(left)
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("QEMU closed the guest agent socket")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            reply = json.loads(line.strip(b"\xff").strip() or b"{}")
            if "error" in reply:
                raise TestGroundError(f"guest agent: {command}: {reply['error']}")
            if command != "guest-sync" or reply.get("return") == arguments.get("id"):
                return reply.get("return")

    def ready(self) -> bool:
        """Without blocking for long: has the agent answered one of the guest-syncs sent so far? A new one
        goes out every 2 s (QEMU keeps what the guest has not read, so the agent answers all of them)."""
        if time.monotonic() >= self.next_sync:
            sync = uuid.uuid4().int % 2**31
            self.sent.add(sync)
            self.sock.sendall(
                json.dumps({"execute": "guest-sync", "arguments": {"id": sync}}).encode() + b"\n"
            )
            self.next_sync = time.monotonic() + 2
        self.sock.settimeout(0.2)
        try:
            self.buf += self.sock.recv(65536)
        except TimeoutError:
            pass
        lines = self.buf.split(b"\n")
        return any(
            json.loads(line.strip(b"\xff").strip() or b"{}").get("return") in self.sent for line in lines[:-1]
        )


def _ssh_argv(key: pathlib.Path, port: int, user: str, command: str) -> list[str]:
    argv = ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
    argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    return [*argv, f"{user}@127.0.0.1", command]


def _ssh(key: pathlib.Path, port: int, user: str, command: str, timeout: float = 20) -> str:
    proc = subprocess.run(
        _ssh_argv(key, port, user, command), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise TestGroundError(f"ssh {user}: {command}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def qemu_argv(
    overlay: pathlib.Path, seed: pathlib.Path, console: pathlib.Path, agent: pathlib.Path, port: int
) -> list[str]:
    """Plain QEMU under TCG with what kubenova's domain has: virtio disks (root, read-only config drive),
    a virtio NIC (user networking that reaches nothing outside; ssh forwarded to the static address),
    the guest agent's port, and the serial console in a file."""
    return [
        "qemu-system-x86_64",
        "-machine", "pc,accel=tcg",
        "-smp", "2",
        "-m", "1024",
        "-nodefaults",
        "-nographic",
        "-serial", f"file:{console}",
        "-drive", f"file={overlay},if=virtio,format=qcow2",
        "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-{GUEST_ADDRESS}:22",
        "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
        "-chardev", f"socket,id=qga0,path={agent},server=on,wait=off",
        "-device", "virtio-serial-pci",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ]  # fmt: skip


class _Boot:
    """One QEMU run of the image and the probes a test would use, each polled without blocking for long."""

    def __init__(self, argv: list[str], work: pathlib.Path, key: pathlib.Path, port: int) -> None:
        self.work, self.key, self.port = work, key, port
        self.console, self.agent_sock = work / "console.log", work / "qga.sock"
        self.agent: _Agent | None = None
        self.probe: subprocess.Popen[bytes] | None = None
        self.start = time.monotonic()
        with open(work / "qemu.log", "wb") as log:
            self.qemu = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def milestone(self) -> str:
        """Seconds since QEMU started, and the CPU time it used (which says more on a busy host)."""
        cpu = procs.cpu_seconds(self.qemu.pid)  # with other work on the cores, more telling than wall time
        return f"{time.monotonic() - self.start:.1f} s (QEMU CPU {cpu:.1f} s)"

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def agent_ready(self) -> bool:
        if self.agent is None and self.agent_sock.exists():
            self.agent = _Agent(self.agent_sock)
        return self.agent is not None and self.agent.ready()

    def ssh_ready(self) -> bool:
        """One ssh attempt at a time: before the guest has its address, one hangs for seconds."""
        if self.probe is not None and self.probe.poll() is not None:
            if self.probe.returncode == 0:
                return True
            self.probe = None
        if self.probe is None:
            argv = _ssh_argv(self.key, self.port, cloud_image.DEFAULT_USER, "true")
            self.probe = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return False

    def close(self) -> None:
        if self.probe is not None and self.probe.poll() is None:
            self.probe.kill()
        if self.agent is not None:
            self.agent.sock.close()
        procs.terminate(self.qemu.pid)
        self.qemu.wait()


def _seed(work: pathlib.Path, key: pathlib.Path) -> pathlib.Path:
    """The config drive, made by kubenova's own code from an instance spec, as the agent makes it."""
    spec = InstanceSpec(
        uuid=str(uuid.uuid4()),
        name=HOSTNAME,
        namespace="default",
        vcpus=2,
        memory_mib=1024,
        user_data=USER_DATA.format(key=key.with_suffix(".pub").read_text().strip()),
        network_config=NETWORK_CONFIG,
        injected_files=(InjectedFile(*INJECTED),),
        admin_password="kubenova-check",
    )
    configdrive.write(cloudinit.files(spec), work / "seed.iso")
    return work / "seed.iso"


def verify(image: pathlib.Path, work: pathlib.Path, timeout: float = 600) -> dict[str, str]:
    """Boot `image` (through an overlay: the image stays untouched) and check it: when each milestone came
    (from QEMU's start), and what the guest said, by name. Raises TestGroundError on the first failure."""
    key, overlay = work / "id_ed25519", work / "root.qcow2"
    procs.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], "making an ssh key", FIX)
    procs.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(overlay)]
        + [f"{ROOT_GIB}G"],
        "making the overlay",
        cloud_image.FIX,
    )
    seed, port = _seed(work, key), _free_port()
    boot = _Boot(qemu_argv(overlay, seed, work / "console.log", work / "qga.sock", port), work, key, port)
    markers = {
        "booted marker": cloud_image.BOOTED,
        "agent marker": cloud_image.AGENT_UP,
        "runcmd marker": RUNCMD_MARKER,
        "cloud-init done": cloud_image.CLOUD_INIT_DONE,
        "login prompt": "login:",
    }
    found: dict[str, str] = {}
    try:
        while len(found) < len(markers) + 2:
            if boot.qemu.poll() is not None:
                raise TestGroundError(f"QEMU exited ({boot.qemu.returncode}); see {work / 'qemu.log'}")
            if time.monotonic() - boot.start > timeout:
                missing = [name for name in [*markers, "guest agent", "ssh"] if name not in found]
                raise TestGroundError(f"not within {timeout:.0f}s: {', '.join(missing)}; see {boot.console}")
            text = boot.console_text()
            for name, marker in markers.items():
                if name not in found and marker in text:
                    found[name] = boot.milestone()
            for name, ready in (("guest agent", boot.agent_ready), ("ssh", boot.ssh_ready)):
                if name not in found and ready():
                    found[name] = boot.milestone()
            time.sleep(0.2)
        assert boot.agent is not None
        found.update(_agent_checks(boot.agent))
        done = next(line for line in boot.console_text().splitlines() if cloud_image.CLOUD_INIT_DONE in line)
        if f"{cloud_image.CLOUD_INIT_DONE} ok" not in done:
            raise TestGroundError(f"cloud-init reported errors: {done.strip()}")
        found["cloud-init"] = done.split(cloud_image.CLOUD_INIT_DONE, 1)[1].strip()
        found.update(_inside(key, port))
    finally:
        boot.close()
    return found


def _agent_checks(agent: _Agent) -> dict[str, str]:
    agent.call("guest-sync", 10, id=uuid.uuid4().int % 2**31)  # past every answer still queued
    ping = agent.call("guest-ping", 10)
    osinfo = agent.call("guest-get-osinfo", 10)
    if not isinstance(osinfo, dict) or osinfo.get("id") != "debian":
        raise TestGroundError(f"guest-get-osinfo: {osinfo}")
    return {
        "guest-ping": json.dumps(ping),
        "guest-get-osinfo": f"{osinfo.get('pretty-name')} {osinfo.get('kernel-release')}",
    }


def _inside(key: pathlib.Path, port: int) -> dict[str, str]:
    """What cloud-init did, seen over ssh."""
    user = cloud_image.DEFAULT_USER
    checks: dict[str, str] = {}
    if _ssh(key, port, "root", "id -u").strip() != "0":
        raise TestGroundError("ssh as root did not log in as root")
    address = _ssh(key, port, user, "ip -4 -o addr show dev eth0")
    if f"{GUEST_ADDRESS}/24" not in address:
        raise TestGroundError(f"eth0 lacks the static address from network-config: {address.strip()}")
    checks["eth0"] = " ".join(address.split()[1:4])
    checks["networkd files"] = _ssh(key, port, user, "cd /etc/systemd/network && echo *.network").strip()
    # resolved (no D-Bus for resolvectl) lists the network config's nameservers here
    if "nameserver 10.0.2.3" not in _ssh(key, port, user, "cat /run/systemd/resolve/resolv.conf"):
        raise TestGroundError("the nameserver from network-config is not in resolved's resolv.conf")
    path, content = INJECTED
    if _ssh(key, port, user, f"cat {shlex.quote(path)}").encode() != content:
        raise TestGroundError(f"the injected file {path} is missing or differs")
    if not _ssh(key, port, user, f"sudo -n grep ^{user}: /etc/shadow").split(":")[1].startswith("$"):
        raise TestGroundError("the admin password from vendor-data was not set")
    if _ssh(key, port, user, "hostname").strip() != HOSTNAME:
        raise TestGroundError("the hostname from meta-data was not set")
    checks["root fs"] = " ".join(_ssh(key, port, user, "df -h --output=size,avail / | tail -1").split())
    # cloud-final ends after multi-user.target; the boot is finished when its last job is
    _ssh(key, port, "root", "systemctl is-system-running --wait >/dev/null || true", timeout=120)
    checks["systemd-analyze"] = _ssh(key, port, user, "systemd-analyze time | head -1").strip()
    blame = _ssh(key, port, user, "systemd-analyze blame --no-pager | head -8")
    checks["slowest units"] = "; ".join(" ".join(line.split()) for line in blame.splitlines())
    return checks


def main(layout: Layout, image: pathlib.Path) -> None:
    """Boot and check `image` in a temporary folder under the cache (kept on failure, to read the console)."""
    work = pathlib.Path(tempfile.mkdtemp(dir=layout.cache / "cloud", prefix="check."))
    found = verify(image, work)
    for name, value in found.items():
        print(f"{name}: {value}")
    subprocess.run(["rm", "-rf", str(work)], check=False)
