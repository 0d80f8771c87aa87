"""The node's default network on the real test ground: a guest's address in status, kept across a stop and
start; two guests reaching each other; spec.firewall and the node's provider rules deciding what gets in,
seen from the guests' own traffic (the test guest's probe hook) and from the host."""

from __future__ import annotations

import contextlib
import ipaddress
import pathlib
import re
import shutil
import socket
import threading
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import libvirt
import pytest

from kubenova.driver.base import DriverError
from kubenova.driver.images import ImageStore
from kubenova.driver.libvirt.driver import LibvirtDriver
from kubenova.driver.libvirt.network import hosts_dir_name, network_xml
from kubenova.driver.types import InstanceSpec, Interface, KernelBoot, NodeNetwork, stable_mac
from kubenova.handlers.shared import COMPUTENODES, GROUP, VERSION
from testground import ground as testground
from testground import guest, libvirt_host
from tests.helpers import eventually
from tests.integration.test_agent import console_text, delete_and_wait, patch_spec, wait_ready
from tests.integration.test_image_imports import create
from tests.integration.test_virtualinstance import get, make


def leased(custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str) -> str | None:
    """The address status says the node network's DHCP leased to the instance's first interface."""
    status = (get(custom, namespace, name) or {}).get("status") or {}
    interfaces = status.get("interfaces") or [{}]
    address = interfaces[0].get("ipAddress")
    return str(address) if address and (status.get("ipAddresses") or [None])[0] == address else None


def wait_leased(custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str) -> str:
    return eventually(lambda: leased(custom, namespace, name), 120, 0.2, f"an address for {name} in status")


def probing(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str, target: str
) -> dict[str, Any]:
    """A test guest that GETs http://<target>:80/ every second once it has its lease."""
    return make(
        name,
        boot={
            "kernel": {
                "image": guest.KERNEL,
                "initrd": guest.INITRD,
                "cmdline": f"{guest.CMDLINE} {guest.probe_hook(f'{target}:{guest.HTTP_PORT}')}",
            }
        },
    )


def last_probe(ground: testground.Ground, uid: str, since: int) -> str | None:
    """The newest probe result the guest printed after ``since`` characters of its console: ok or fail."""
    found = re.findall(rf"{guest.PROBE} (ok|fail)", console_text(ground, uid)[since:])
    return found[-1] if found else None


def wait_probe(ground: testground.Ground, uid: str, want: str) -> None:
    since = len(console_text(ground, uid))
    eventually(lambda: last_probe(ground, uid, since) == want, 60, 0.5, f"the guest's probe to say {want}")


def http_from_host(address: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{address}:{guest.HTTP_PORT}/", timeout=2) as reply:
            return str(reply.read().decode())
    except OSError:
        return None


def tcp_from_host(address: str) -> str | None:
    try:
        with socket.create_connection((address, guest.TCP_PORT), timeout=2) as conn:
            conn.settimeout(2)
            return conn.recv(200).decode()
    except OSError:
        return None


def test_an_instance_without_interfaces_gets_an_address_it_keeps_across_stop_and_start(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    uid = create(custom, namespace, make("net-keep"))
    address = wait_leased(custom, namespace, "net-keep")
    assert ipaddress.ip_address(address) in ipaddress.ip_network(testground.node_subnet(ground.node))
    # the guest itself got it by DHCP
    eventually(
        lambda: f"{guest.DHCP} eth0 {address}/24" in console_text(ground, uid), 30, 0.5, "the DHCP line"
    )
    # reachable from the host (the network's gateway): the guest's web server names its MAC
    body = eventually(lambda: http_from_host(address), 30, 0.5, "the guest's web server")
    mac = get(custom, namespace, "net-keep")["status"]["interfaces"][0]["macAddress"]  # type: ignore[index]
    assert body.strip() == f"{guest.HTTP} {mac}"

    patch_spec(custom, namespace, "net-keep", {"powerState": "Stopped"})
    wait_ready(custom, namespace, "net-keep", "Stopped")
    eventually(
        lambda: not ((get(custom, namespace, "net-keep") or {}).get("status") or {}).get("ipAddresses"),
        30,
        0.2,
        "ipAddresses cleared while stopped",
    )
    patch_spec(custom, namespace, "net-keep", {"powerState": "Running"})
    assert wait_leased(custom, namespace, "net-keep") == address
    delete_and_wait(custom, namespace, "net-keep")


def set_provider_rules(
    custom: kubernetes.client.CustomObjectsApi, node: str, rules: list[Any] | None
) -> None:
    firewall = None if rules is None else {"ingress": rules}
    custom.patch_cluster_custom_object(GROUP, VERSION, COMPUTENODES, node, {"spec": {"firewall": firewall}})


def test_guests_reach_each_other_and_the_firewall_admits_and_drops_what_it_says(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
) -> None:
    create(custom, namespace, make("web"))
    web = wait_leased(custom, namespace, "web")
    client_uid = create(custom, namespace, probing(custom, namespace, "client", web))
    client = wait_leased(custom, namespace, "client")
    wait_probe(ground, client_uid, "ok")  # no spec.firewall: everything gets in
    assert f"{guest.PROBE} ok {guest.HTTP} " in console_text(ground, client_uid)

    # Only TCP 7000 may come in, applied to the running guest: the probe to port 80 now fails.
    patch_spec(
        custom, namespace, "web", {"firewall": {"ingress": [{"protocol": "TCP", "port": guest.TCP_PORT}]}}
    )
    wait_probe(ground, client_uid, "fail")
    assert (tcp_from_host(web) or "").startswith(guest.TCP)  # port 7000 is open to the host
    assert http_from_host(web) is None

    # Port 80 from the client alone: the client gets in again, the host (another source) does not.
    rules = [{"protocol": "TCP", "port": guest.HTTP_PORT, "cidr": f"{client}/32"}]
    patch_spec(custom, namespace, "web", {"firewall": {"ingress": rules}})
    wait_probe(ground, client_uid, "ok")
    assert http_from_host(web) is None and tcp_from_host(web) is None

    # A provider rule on the node drops the client's HTTP whatever the instance allows, until removed.
    try:
        deny = {"action": "Deny", "protocol": "TCP", "port": guest.HTTP_PORT, "cidr": f"{client}/32"}
        set_provider_rules(custom, ground.node, [deny])
        wait_probe(ground, client_uid, "fail")
    finally:
        set_provider_rules(custom, ground.node, None)
    wait_probe(ground, client_uid, "ok")

    # An empty ingress list lets nothing in.
    patch_spec(custom, namespace, "web", {"firewall": {"ingress": []}})
    wait_probe(ground, client_uid, "fail")
    delete_and_wait(custom, namespace, "client")
    delete_and_wait(custom, namespace, "web")


def network_ready(custom: kubernetes.client.CustomObjectsApi, node: str) -> dict[str, Any]:
    body = custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, node)
    return next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == "NetworkReady"), {})


def test_a_node_whose_subnet_overlaps_another_nodes_says_so_and_names_the_fix(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
) -> None:
    ghost = "net-overlap-ghost"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ComputeNode",
        "metadata": {"name": ghost},
        "spec": {},
    }
    custom.create_cluster_custom_object(GROUP, VERSION, COMPUTENODES, body)
    try:
        status = {"status": {"network": {"subnet": "10.222.0.128/25"}}}
        custom.patch_cluster_custom_object_status(GROUP, VERSION, COMPUTENODES, ghost, status)
        # The agent looks at the other nodes' subnets when its own spec.firewall or spec.network changes.
        set_provider_rules(custom, ground.node, [])
        said = eventually(
            lambda: (
                (c := network_ready(custom, ground.node)).get("reason") == "SubnetOverlap"
                and ghost in c.get("message", "")
                and c
            ),
            60,
            0.5,
            "NetworkReady=False SubnetOverlap",
        )
        assert (
            said["status"] == "False"
            and ghost in said["message"]
            and "spec.network.subnet" in said["message"]
        )
        events = core.list_event_for_all_namespaces(field_selector=f"involvedObject.name={ground.node}").items
        assert any(e.reason == "SubnetOverlap" for e in events)
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, COMPUTENODES, ghost)
        set_provider_rules(custom, ground.node, None)
    eventually(
        lambda: network_ready(custom, ground.node).get("status") == "True", 60, 0.5, "NetworkReady again"
    )


#: Each side's turns in the race below: ten tripped the unlocked code every time here (~20 s).
ROUNDS = 10


@contextlib.contextmanager
def scratch_network(ground: testground.Ground, subnet: str) -> Iterator[tuple[LibvirtDriver, NodeNetwork]]:
    """A libvirt driver on node-0's libvirtd with a node network of its own (``subnet``), removed after."""
    network = NodeNetwork("kn-scratch", "knscratch0", subnet)
    driver = scratch_driver(ground)
    driver.ensure_node_network(network)
    try:
        yield driver, network
    finally:
        net = driver.host.get_connection().networkLookupByName(network.name)
        net.destroy()
        net.undefine()
        shutil.rmtree(scratch_hosts_dir(ground, network))
        driver.host.close()
        driver.lease_host.close()


def scratch_driver(ground: testground.Ground, files: bool = True, fresh: bool = True) -> LibvirtDriver:
    """A libvirt driver on node-0's libvirtd, in a folder of its own (``fresh``: emptied first); ``files``:
    it keeps reservations in the network's dnsmasq folder (the agent's --libvirt-dnsmasq-dir)."""
    root = ground.node_dir() / "netx"  # short: a console socket's path must fit 107 bytes
    if fresh:
        shutil.rmtree(root, ignore_errors=True)
    return LibvirtDriver(
        ground.libvirt_uri,
        "qemu",
        root / "instances",
        ImageStore(ground.image_store),
        root / "volumes",
        dnsmasq_dir=libvirt_host.dnsmasq_dir(ground.layout, ground.node) if files else None,
    )


def scratch_hosts_dir(ground: testground.Ground, network: NodeNetwork) -> pathlib.Path:
    return libvirt_host.dnsmasq_dir(ground.layout, ground.node) / hosts_dir_name(network.name)


def defined(driver: LibvirtDriver, network: NodeNetwork) -> dict[str, str]:
    """MAC -> address of the DHCP host entries in the network's live definition."""
    xml = driver.host.get_connection().networkLookupByName(network.name).XMLDesc(0)
    return {str(host.get("mac")): str(host.get("ip")) for host in ET.fromstring(xml).iter("host")}


def reservations(driver: LibvirtDriver, network: NodeNetwork) -> dict[str, str]:
    """MAC -> address of every reservation: the definition's and the files dnsmasq reads (``mac,ip``)."""
    folder = driver.dnsmasq_dir / hosts_dir_name(network.name) if driver.dnsmasq_dir else None
    files = [path.read_text().strip().split(",") for path in folder.iterdir()] if folder else []
    return {**defined(driver, network), **{mac: ip for mac, ip in files}}


def plug(driver: LibvirtDriver, network: NodeNetwork, uid: str) -> str:
    """Plug one interface of the instance ``uid`` (which has no domain here) into the network; its MAC."""
    mac = stable_mac(uid, "eth0")
    driver.plug_vifs(uid, [Interface("eth0", network.name, mac)])
    return mac


def test_reservations_made_while_the_agent_rechecks_its_network_never_trip_each_other(
    ground: testground.Ground,
) -> None:
    """The agent re-checks its network (and re-asserts the hook by a reservation it adds and removes) while
    a migration's target reserves an address in a full pool, which drops the stale one and has dnsmasq
    reload by the same add and remove: both edit the same DHCP section, and one of them failed when the
    other removed an entry it had just read (CI: "couldn't locate a matching dhcp host entry")."""
    failures: list[BaseException] = []

    def churn(work: Callable[[int], object]) -> None:
        try:
            for i in range(ROUNDS):
                work(i)
        except BaseException as exc:  # the test's verdict, from its own thread
            failures.append(exc)

    # a pool of one address: each reservation evicts the other's, a delete and an add each round
    with scratch_network(ground, "10.223.250.0/30") as (driver, network):
        threads = [
            threading.Thread(target=churn, args=(lambda i: plug(driver, network, f"race-{i % 2}"),)),
            threading.Thread(target=churn, args=(lambda _: driver.ensure_node_network(network),)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures
        # the last reservation is there, the hook's placeholder (the gateway's address) is not
        hosts = reservations(driver, network)
        assert stable_mac(f"race-{(ROUNDS - 1) % 2}", "eth0") in hosts
        assert network.gateway not in hosts.values()


def test_a_gone_instances_reservation_stays_while_the_pool_has_room_and_goes_when_it_is_needed(
    ground: testground.Ground,
) -> None:
    """dnsmasq forgets a removed reservation only when it reloads (a change of the network, ~1.2 s), so a
    plug drops none it does not need; when the pool is full, the stale ones go, dnsmasq reloads, and a real
    guest gets the address a gone instance held."""
    with scratch_network(ground, "10.223.250.0/29") as (driver, network):  # five addresses
        gone = [plug(driver, network, f"gone-{i}") for i in range(5)]  # none has a domain: all stale
        assert all(mac in reservations(driver, network) for mac in gone)
        before = reservations(driver, network)
        plug(driver, network, "gone-0")  # a returning instance keeps its address, nothing changes
        assert reservations(driver, network) == before
        arriving = scratch_spec(ground, network, "arriving")
        driver.spawn(arriving)  # no room: the stale ones make way
        try:
            driver.plugged(arriving.uuid)
            mac = stable_mac(arriving.uuid, "eth0")
            hosts = reservations(driver, network)
            assert hosts == {mac: "10.223.250.2"} and before[gone[0]] == "10.223.250.2"
            eventually(
                lambda: driver.dhcp_leases().get(mac) == "10.223.250.2", 120, 1, "the guest's lease of .2"
            )
        finally:
            driver.destroy(arriving.uuid)


def test_a_migration_target_reserves_its_address_behind_the_transfer(ground: testground.Ground) -> None:
    """pre_live_migration plugs the arriving interfaces at once and reserves their addresses on a thread
    (each change of the network takes libvirt ~0.6 s, which the transfer need not wait for); the
    migration's end joins it, after which the reservation is there."""
    with scratch_network(ground, "10.223.250.0/29") as (driver, network):
        mac = stable_mac("arriving", "eth0")
        driver.plug_vifs_behind("arriving", [Interface("eth0", network.name, mac)])
        driver.plugged("arriving")
        assert mac in reservations(driver, network)
        driver.plugged("arriving")  # joined once; a second end (a retried step) has nothing to wait for


def scratch_spec(
    ground: testground.Ground, network: NodeNetwork, name: str, kernel: str = ""
) -> InstanceSpec:
    """The test guest on the scratch network (``kernel``: a path of its own, the test kernel if empty)."""
    store = ImageStore(ground.image_store)
    return InstanceSpec(
        uuid=str(uuid.uuid4()),
        name=name,
        namespace="t",
        vcpus=1,
        memory_mib=96,  # the test guest's kernel hangs silently in 64
        boot=KernelBoot(
            kernel or store.resolve("k", guest.KERNEL), store.resolve("i", guest.INITRD), guest.CMDLINE
        ),
        interfaces=(Interface("eth0", network.name),),
    )


def test_a_spawn_reserves_after_its_start_and_a_failed_one_reserves_nothing(
    ground: testground.Ground,
) -> None:
    """spawn reserves the address on a thread once the domain started: libvirt takes ~0.6 s per change of
    the network, and a start waits for one in progress (both need the network). A spawn that fails
    reserves nothing."""
    with scratch_network(ground, "10.223.250.0/29") as (driver, network):
        started = scratch_spec(ground, network, "reserving")
        driver.spawn(started)
        try:
            assert driver.instance_exists(started.uuid)
            driver.plugged(started.uuid)
            assert stable_mac(started.uuid, "eth0") in reservations(driver, network)
            broken = scratch_spec(ground, network, "broken", str(ground.node_dir() / "no-such-vmlinuz"))
            with pytest.raises(DriverError):
                driver.spawn(broken)  # QEMU cannot start
            assert broken.uuid not in driver._reserving and not driver.instance_exists(broken.uuid)
            assert stable_mac(broken.uuid, "eth0") not in reservations(driver, network)
        finally:
            driver.destroy(started.uuid)


def test_an_agent_that_died_before_a_reservation_makes_it_when_it_starts_again(
    ground: testground.Ground,
) -> None:
    """The reservation comes after the start: an agent killed in between leaves a guest without one, and
    its next start (a new driver's first ensure_node_network) makes it."""
    with scratch_network(ground, "10.223.250.0/29") as (driver, network):
        running = scratch_spec(ground, network, "orphan")
        driver.spawn(running)
        again = LibvirtDriver(
            ground.libvirt_uri,
            "qemu",
            driver.instances_dir,
            driver.images,
            driver.volumes.root,
            dnsmasq_dir=driver.dnsmasq_dir,
        )
        try:
            driver.plugged(running.uuid)
            mac = stable_mac(running.uuid, "eth0")
            assert mac in reservations(driver, network)
            (scratch_hosts_dir(ground, network) / mac.replace(":", "-")).unlink()  # as if it died before
            assert mac not in reservations(driver, network)
            again.ensure_node_network(network)
            assert mac in reservations(again, network)
        finally:
            driver.destroy(running.uuid)
            again.host.close()
            again.lease_host.close()


def test_a_guest_that_asked_before_its_reservation_keeps_the_address_it_got(
    ground: testground.Ground,
) -> None:
    """A reservation made behind a start can come after the guest's DHCP request: the lease it holds
    becomes its reservation, so its address does not change at the next renewal."""
    with scratch_network(ground, "10.223.250.0/29") as (driver, network):
        mac = stable_mac("early", "eth0")
        driver.dhcp_leases = lambda poll=False: {mac: "10.223.250.5"}  # type: ignore[method-assign]
        driver.plug_vifs_behind("early", [Interface("eth0", network.name, mac)])
        driver.plugged("early")
        assert reservations(driver, network) == {mac: "10.223.250.5"}


def test_a_reservation_is_a_file_dnsmasq_serves_at_once_and_the_network_is_not_changed(
    ground: testground.Ground,
) -> None:
    """A change of the network's definition costs libvirt ~0.6 s, which a domain's start on the host waits
    for: reservations are files in the network's dnsmasq folder instead. Two real guests boot, ask for
    their addresses, and get the ones their files say (not the first free ones: three phantom reservations
    come first), while the network's definition holds no reservation."""
    with scratch_network(ground, "10.223.250.0/28") as (driver, network):
        for i in range(3):
            plug(driver, network, f"phantom-{i}")  # .2, .3 and .4: no guest asks for them
        net = driver.host.get_connection().networkLookupByName(network.name)
        xml = net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)
        specs = [scratch_spec(ground, network, f"served-{i}") for i in range(2)]
        for spec in specs:
            driver.spawn(spec)
        try:
            for spec in specs:
                driver.plugged(spec.uuid)
            files = reservations(driver, network)
            wanted = {stable_mac(spec.uuid, "eth0"): files[stable_mac(spec.uuid, "eth0")] for spec in specs}
            assert sorted(wanted.values()) == ["10.223.250.5", "10.223.250.6"]
            assert net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE) == xml and defined(driver, network) == {}
            leases = eventually(
                lambda: got if set(wanted) <= set(got := driver.dhcp_leases()) else None,
                120,
                1,
                "both guests' DHCP leases",
            )
            assert {mac: leases[mac] for mac in wanted} == wanted
        finally:
            for spec in specs:
                driver.destroy(spec.uuid)


def test_a_network_with_reservations_in_its_definition_moves_them_to_files_once_no_guest_uses_it(
    ground: testground.Ground,
) -> None:
    """A node network made before reservations were files (no dnsmasq folder in its definition) keeps them
    in its definition while a guest uses it (making it again would cut the guest off); once none does, the
    agent makes it again with the folder, its reservations moved there."""
    network = NodeNetwork("kn-scratch", "knscratch0", "10.223.250.0/29")
    old = ET.fromstring(network_xml(network))
    old.remove(next(e for e in old if e.tag.endswith("options")))
    conn = libvirt.open(ground.libvirt_uri)
    conn.networkDefineXML(ET.tostring(old, encoding="unicode")).create()
    before = scratch_driver(ground, files=False)  # an agent of before
    now = scratch_driver(ground, fresh=False)
    try:
        before.ensure_node_network(network)
        guest_on_it = scratch_spec(ground, network, "holding")
        before.spawn(guest_on_it)
        before.plugged(guest_on_it.uuid)
        mac = stable_mac(guest_on_it.uuid, "eth0")
        address = defined(before, network)[mac]

        now.ensure_node_network(network)  # a guest uses it: kept as it is, reservations in the definition
        assert now._hosts_dir is None and defined(now, network) == {mac: address}
        plug(now, network, "while-held")
        assert stable_mac("while-held", "eth0") in defined(now, network)

        before.destroy(guest_on_it.uuid)
        now.node_network = None  # as a new agent's first ensure
        now.ensure_node_network(network)
        assert now._hosts_dir == scratch_hosts_dir(ground, network)
        assert defined(now, network) == {}
        moved = reservations(now, network)
        assert moved[mac] == address  # the returning instance keeps its address
        assert stable_mac("while-held", "eth0") in moved
        assert "dhcp-hostsdir=" in conn.networkLookupByName(network.name).XMLDesc(0)
    finally:
        net = conn.networkLookupByName(network.name)
        net.destroy()
        net.undefine()
        shutil.rmtree(scratch_hosts_dir(ground, network), ignore_errors=True)
        for driver in (before, now):
            driver.host.close()
            driver.lease_host.close()
        conn.close()
