"""libvirt's qemu hook on a kubenova node: an incoming live migration runs only the definition this
node's agent prepared for it.

In a peer-to-peer live migration the source's libvirtd sends the destination definition. The target's
agent builds that definition (``pre_live_migration``) and hands it to the source through the Migration's
status, but a compromised source could send another one: a disk that is another instance's file or a
host device, QEMU arguments of its own, a network the namespace may not join. Disks are copied into the
definition's files before the guest runs, so a check after arrival would come too late. libvirtd calls
this hook with the incoming definition before it starts QEMU (``qemu <name> migrate begin -``, the XML on
stdin); a non-zero exit refuses the migration, and the source reports this hook's message.

The check compares what reaches the host: every path (disks and their backing files, kernel, logs,
sockets), every network, bridge and filter, and the emulator, must be one the agent's own definition
names (backing files: the node's image cache; the emulator: the host's QEMU); host devices, shared
folders and raw QEMU arguments are refused outright. What libvirt adds itself (controllers, addresses,
aliases) reaches nothing.

Standalone on purpose (the standard library only): libvirtd runs it on the host, where kubenova is not
installed. Install it as /etc/libvirt/hooks/qemu (mode 0755) before libvirtd starts; a ``kubenova-hook.json``
beside it may name the agent's instances folder (``{"instancesDir": ...}``).
"""

from __future__ import annotations

import json
import pathlib
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence

#: Where the agent puts the definition it prepared, in the instance's folder.
INCOMING = "incoming.xml"
DEFAULT_INSTANCES = "/var/lib/kubenova/instances"
QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
#: Devices that hand the guest something of the host's.
HOST_DEVICES = ("hostdev", "redirdev", "filesystem", "shmem", "smartcard")
#: The host's own QEMU, which libvirt names when a definition names none (kubenova's do not).
EMULATORS = frozenset(
    f"{folder}/{name}"
    for folder in ("/usr/bin", "/usr/libexec", "/usr/local/bin")
    for name in ("qemu-system-x86_64", "qemu-system-aarch64", "qemu-kvm", "kvm")
)
#: Attributes that name a host file, device or socket.
PATH_ATTRIBUTES = ("file", "dev", "dir", "path", "socket")
#: Attributes of a disk's <source> that name storage beyond a file: a remote protocol, a pool, an image.
STORAGE_ATTRIBUTES = ("protocol", "name", "pool", "volume")


def host_resources(domain: ET.Element) -> Iterator[str]:
    """What a definition reaches on the host, each as ``kind:value``: every absolute path in any text or
    attribute (an rng backend, a loader, a channel socket as much as a disk), and every network, filter,
    storage name, remote host and libvirt secret."""
    for element in domain.iter():
        tag = element.tag
        text = (element.text or "").strip()
        if isinstance(tag, str) and tag.startswith(QEMU_NS):
            yield f"qemu-namespace:{tag[len(QEMU_NS) :]}"
        elif tag in HOST_DEVICES:
            yield f"device:{tag}"
        elif tag == "emulator" and text:
            yield f"emulator:{text}"
        elif text.startswith("/"):
            yield f"path:{text}"
        elif tag == "interface":
            yield f"interface:{element.get('type')}"
        elif tag == "filterref":
            yield f"filter:{element.get('filter')}"
        elif tag == "secret":
            yield f"secret:{element.get('uuid') or element.get('usage')}"
        elif tag == "host" and element.get("name"):
            yield f"host:{element.get('name')}:{element.get('port', '')}"
        for name, value in element.attrib.items():
            if value.startswith("/") or (tag in ("source", "log") and name in PATH_ATTRIBUTES):
                yield f"path:{value}"
        if tag == "source":
            for name in ("network", "bridge", *STORAGE_ATTRIBUTES):
                if element.get(name):
                    yield f"{name}:{element.get(name)}"


def backing_files(domain: ET.Element) -> set[str]:
    """The paths of the disks' backing chains, which libvirt adds to a running definition."""
    found: set[str] = set()
    for store in domain.iter("backingStore"):
        for source in store.findall("source"):
            found.update(f"path:{source.get(name)}" for name in PATH_ATTRIBUTES if source.get(name))
    return found


def refusal(incoming: ET.Element, prepared: ET.Element, cache: pathlib.Path) -> str | None:
    """Why ``incoming`` may not run here, or None when it reaches only what ``prepared`` does."""
    allowed = set(host_resources(prepared))
    backing = backing_files(incoming)
    extra = []
    for resource in sorted(set(host_resources(incoming)) - allowed):
        inside_cache = pathlib.PurePath(resource.removeprefix("path:")).parent == pathlib.PurePath(cache)
        if (resource in backing and inside_cache) or resource.removeprefix("emulator:") in EMULATORS:
            continue
        extra.append(resource)
    if extra:
        return "reaches what this node's agent did not prepare: " + ", ".join(extra)
    return None


def instances_dir(hooks: pathlib.Path) -> pathlib.Path:
    config = hooks / "kubenova-hook.json"
    if config.exists():
        return pathlib.Path(json.loads(config.read_text())["instancesDir"])
    return pathlib.Path(DEFAULT_INSTANCES)


def check_incoming(xml: str, instances: pathlib.Path) -> str | None:
    """Why the incoming definition ``xml`` may not run, or None."""
    incoming = ET.fromstring(xml)
    uuid = (incoming.findtext("uuid") or "").strip()
    if not uuid or "/" in uuid or uuid.startswith("."):
        return f"the incoming definition names no usable UUID ({uuid!r})"
    prepared_file = instances / uuid / INCOMING
    if not prepared_file.exists():
        return f"this node's agent prepared no migration of {uuid} (no {prepared_file})"
    return refusal(incoming, ET.fromstring(prepared_file.read_text()), instances / "_base")


def main(argv: Sequence[str], stdin: str, hooks: pathlib.Path) -> int:
    """libvirt's arguments: the domain's name, the operation, its sub-operation, an extra argument."""
    if len(argv) < 3 or (argv[1], argv[2]) != ("migrate", "begin"):
        return 0  # every other operation goes on as libvirt would have it
    reason = check_incoming(stdin, instances_dir(hooks))
    if reason is None:
        return 0  # an empty answer keeps the definition as it came
    print(f"kubenova refused the incoming migration of {argv[0]}: {reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], sys.stdin.read(), pathlib.Path(__file__).parent))
