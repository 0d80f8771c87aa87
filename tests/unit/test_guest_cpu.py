"""The guest's CPU: host-model under KVM, qemu64 under TCG, or spec.cpu.model exactly; the models each node
can give (ComputeNode status.cpuModels) decide placement, and the agent checks again before it defines."""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import re
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest
import yaml

from kubenova.driver.base import InstanceSpec, InvalidInstanceSpec, KernelBoot, check_cpu_model
from kubenova.driver.fake import FakeDriver
from kubenova.driver.libvirt.config import GuestConfig, GuestCPU, domain_name
from kubenova.driver.libvirt.hostconfig import DomainCapabilities
from kubenova.driver.libvirt.lifecycle import changed_fields
from kubenova.handlers.agent.node_reporter import NodeReporter
from kubenova.handlers.agent.translate import PREVIOUS_FORMAT, definition_digest
from kubenova.handlers.controller.binding import cpu_model_of, node_view
from kubenova.handlers.controller.placement import NodeView, Unschedulable, Usage, choose_node
from kubenova.handlers.shared import COMPUTENODES
from tests.unit.agent_harness import Node, make_node
from tests.unit.reconcile_fakes import FakeApiserver, MemoryStatusWriter, condition
from tests.unit.test_reconcile_migrations import Cluster

REPO = pathlib.Path(__file__).resolve().parents[2]
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def config(domain_type: str = "qemu", cpu_model: str | None = None) -> GuestConfig:
    return GuestConfig(
        uuid=str(uuid.uuid4()),
        name=domain_name("ns", "vm"),
        namespace="ns",
        instance_name="vm",
        vcpus=1,
        memory_mib=128,
        console_path="/c/console.log",
        domain_type=domain_type,
        kernel="/images/vmlinuz",
        cpu_model=cpu_model,
    )


def cpu_of(xml: str) -> tuple[str | None, str | None, str | None, str | None]:
    cpu = ET.fromstring(xml).find("cpu")
    assert cpu is not None
    model = cpu.find("model")
    return (
        cpu.get("mode"),
        cpu.get("match"),
        model.text if model is not None else None,
        model.get("fallback") if model is not None else None,
    )


# --- the domain XML ------------------------------------------------------------------------------


def test_under_tcg_the_guest_gets_qemu64_exactly() -> None:
    assert cpu_of(config("qemu").to_xml()) == ("custom", "exact", "qemu64", "forbid")


def test_under_kvm_the_guest_gets_the_hosts_own_cpu() -> None:
    assert cpu_of(config("kvm").to_xml()) == ("host-model", None, None, None)


@pytest.mark.parametrize("domain_type", ["qemu", "kvm"])
def test_a_named_model_is_given_exactly_and_never_a_lesser_one(domain_type: str) -> None:
    xml = config(domain_type, "Nehalem").to_xml()
    assert cpu_of(xml) == ("custom", "exact", "Nehalem", "forbid")
    assert GuestConfig.parse_dom(xml).cpu_model == "Nehalem", "kept in kubenova's metadata"


def test_libvirt_takes_every_cpu_definition_and_reads_it_back() -> None:
    conn = libvirt.open("test:///default")
    try:
        for made in (config("qemu"), config("kvm"), config("qemu", "Westmere")):
            dom = conn.defineXML(made.to_xml())
            kept = GuestConfig.parse_dom(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            assert kept.cpu == GuestCPU.for_guest(made.domain_type, made.cpu_model)
            assert kept.to_xml() == made.to_xml(), "a definition read back is the one made: no redefine loop"
            dom.undefine()
    finally:
        conn.close()


def test_a_model_name_is_text_in_the_xml_never_markup() -> None:
    attack = "qemu64</model><feature policy='require' name='evil'/><model>x"
    root = ET.fromstring(config(cpu_model=attack).to_xml())
    assert root.find("cpu/feature") is None and root.findtext("cpu/model") == attack


def test_an_older_definition_is_told_apart_and_redefined() -> None:
    """A KVM domain defined with qemu64 before host-model, and without the agent's channel, differs from
    what kubenova makes now, so the agent's redefine gives it both for its next boot."""
    old = config("kvm")
    old.cpu, old.guest_agent = GuestCPU(), False
    parsed = GuestConfig.parse_dom(old.to_xml())
    assert (parsed.cpu, parsed.guest_agent) == (GuestCPU("custom", "qemu64"), False)
    assert parsed.to_xml() != config("kvm").to_xml()


def test_a_changed_model_waits_for_the_next_boot() -> None:
    running, defined = (GuestConfig.parse_dom(c.to_xml()) for c in (config("kvm"), config("kvm", "Nehalem")))
    assert changed_fields(running, defined, pathlib.Path("/nowhere")) == ["spec.cpu.model"]
    # a running host-model guest's <cpu> names the model libvirt expanded it to: that is no change
    expanded = dataclasses.replace(running, cpu=GuestCPU("custom", "Skylake-Client-IBRS"))
    assert changed_fields(expanded, running, pathlib.Path("/nowhere")) == []


# --- what a node can give ------------------------------------------------------------------------

DOMCAPS = """<domainCapabilities><domain>qemu</domain><arch>x86_64</arch><cpu>
  <mode name='host-passthrough' supported='no'/>
  <mode name='host-model' supported='yes'><model fallback='forbid'>qemu64</model></mode>
  <mode name='custom' supported='yes'>
    <model usable='yes' vendor='unknown'>qemu64</model>
    <model usable='yes' vendor='Intel'>Nehalem</model>
    <model usable='no' vendor='AMD'>EPYC-Rome</model>
    <model usable='unknown' vendor='Intel'>Skylake-Client</model>
  </mode></cpu></domainCapabilities>"""


def test_the_usable_models_come_from_libvirts_domain_capabilities() -> None:
    assert DomainCapabilities.parse_dom(DOMCAPS).cpu_models == ("qemu64", "Nehalem")
    assert DomainCapabilities.parse_dom("<domainCapabilities/>").cpu_models == ()


def spec(model: str | None) -> InstanceSpec:
    return InstanceSpec(
        uuid=str(uuid.uuid4()),
        name="vm",
        namespace="ns",
        vcpus=1,
        memory_mib=64,
        boot=KernelBoot("/k", None, ""),
        cpu_model=model,
    )


def test_a_model_the_host_cannot_give_is_refused_naming_the_field_and_the_fix() -> None:
    check_cpu_model(spec(None), ())
    check_cpu_model(spec("Nehalem"), ("qemu64", "Nehalem"))
    with pytest.raises(InvalidInstanceSpec) as refused:
        check_cpu_model(spec("EPYC-Rome"), ("qemu64", "Nehalem"))
    assert refused.value.field == "spec.cpu.model"
    assert "status.cpuModels" in refused.value.message and "remove spec.cpu.model" in refused.value.message


def test_the_fake_host_publishes_its_models_and_refuses_others() -> None:
    driver = FakeDriver(images={"k": b"kernel"}, cpu_models=("qemu64", "Nehalem"))
    assert driver.get_available_resource().cpu_models == ("qemu64", "Nehalem")
    with pytest.raises(InvalidInstanceSpec, match="CPU model 'Haswell'"):
        driver.spawn(dataclasses.replace(spec("Haswell"), boot=KernelBoot("k", None, "")))
    assert driver.list_instances() == []


# --- placement -----------------------------------------------------------------------------------


def view(name: str, models: tuple[str, ...]) -> NodeView:
    return NodeView(name, True, NOW, 4, 4096, 100, cpu_models=frozenset(models))


def test_placement_puts_a_model_only_where_it_runs() -> None:
    nodes = {"a": view("a", ("qemu64",)), "b": view("b", ("qemu64", "Nehalem"))}
    assert choose_node(Usage(1, 128), None, nodes, {}, NOW, cpu_model="Nehalem") == "b"
    assert choose_node(Usage(1, 128), None, nodes, {"b": Usage(1, 4000)}, NOW) == "a", "no model: any node"


def test_an_instance_whose_model_no_node_runs_stays_pending_saying_so() -> None:
    nodes = {"a": view("a", ("qemu64",)), "b": view("b", ())}
    with pytest.raises(Unschedulable, match="no ComputeNode can run CPU model 'Haswell'") as why:
        choose_node(Usage(1, 128), None, nodes, {}, NOW, cpu_model="Haswell")
    assert "spec.cpu.model" in str(why.value) and "status.cpuModels" in str(why.value)
    disabled = {**nodes, "c": dataclasses.replace(view("c", ("Haswell",)), enabled=False)}
    with pytest.raises(Unschedulable, match="a: cannot run CPU model 'Haswell'.*c: disabled"):
        choose_node(Usage(1, 128), None, disabled, {}, NOW, cpu_model="Haswell")


def test_the_node_view_reads_the_published_models() -> None:
    published = node_view("a", {}, {}, {"cpuModels": ["qemu64", "Nehalem"]})
    assert published.cpu_models == frozenset({"qemu64", "Nehalem"})
    assert node_view("a", {}, {}, {}).cpu_models == frozenset()
    assert cpu_model_of({"cpu": {"model": "Nehalem"}}) == "Nehalem" and cpu_model_of({}) is None


# --- the agent ----------------------------------------------------------------------------------


@pytest.fixture
def node(tmp_path: pathlib.Path) -> Node:
    return make_node(tmp_path)


def test_the_agent_refuses_a_model_its_node_cannot_give_naming_the_field(node: Node) -> None:
    uid = node.create("vm", cpu={"model": "Haswell"})
    body = node.get("vm")
    ready = condition(body, "Ready")
    assert body["status"]["phase"] == "Failed" and not node.driver.instance_exists(uid)
    assert ready["reason"] == "InvalidSpec" and ready["message"].startswith("spec.cpu.model:")
    body = node.change("vm", cpu={"model": "Nehalem"})
    assert body["status"]["phase"] == "Running"


def test_a_model_changed_while_running_is_named_until_the_next_boot(node: Node) -> None:
    node.create("vm")
    body = node.change("vm", cpu={"model": "Westmere"})
    assert "spec.cpu.model" in condition(body, "RestartRequired")["message"]
    body = node.change("vm", actions={"reboot": {"id": "r", "type": "Hard"}})
    assert not condition(body, "RestartRequired")


def test_the_crd_refuses_a_model_that_could_break_out_of_its_xml_element() -> None:
    crd = yaml.safe_load((REPO / "crds" / "compute.kubenova.io_virtualinstances.yaml").read_text())
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    model = spec_schema["properties"]["cpu"]["properties"]["model"]
    for good in ("qemu64", "Skylake-Client-IBRS", "Opteron_G5", "EPYC-Rome", "486"):
        assert re.fullmatch(model["pattern"], good), good
    for attack in ("a</model>", "x'/><qemu:commandline", "a b", "-hostmodel", "a\nb", "ü", ""):
        assert not re.fullmatch(model["pattern"], attack), attack
    assert model["maxLength"] <= 64


def test_a_live_migration_target_that_cannot_give_the_model_refuses_before_anything_moves(
    tmp_path: pathlib.Path,
) -> None:
    cluster = Cluster(tmp_path)
    cluster.source.node.change(
        "vm", cpu={"model": "Nehalem"}, actions={"reboot": {"id": "r", "type": "Hard"}}
    )
    cluster.target.node.driver.cpu_models = ("qemu64",)
    cluster.start("Live")
    done = cluster.run()
    assert done["status"]["phase"] == "Failed"
    assert "spec.cpu.model" in done["status"]["message"] and "'Nehalem'" in done["status"]["message"]
    assert cluster.source.node.state(cluster.uid).value == "Running"


def test_the_node_reporter_publishes_the_models_its_host_can_give() -> None:
    api = FakeApiserver()
    api.add(COMPUTENODES, {"metadata": {"name": "node-0"}, "spec": {}})
    driver = FakeDriver("node-0", cpu_models=("qemu64", "Nehalem"))
    reporter = NodeReporter(
        "node-0",
        driver,
        api,
        None,
        "10.0.0.1",
        set,
        lambda *_: None,  # type: ignore[arg-type]
    )
    reporter.writer = MemoryStatusWriter(api, COMPUTENODES)  # type: ignore[assignment]
    reporter.report()
    status = api.objects[(COMPUTENODES, None, "node-0")]["status"]
    assert status["cpuModels"] == ["qemu64", "Nehalem"]
    assert node_view("node-0", {}, {}, status).cpu_models == {"qemu64", "Nehalem"}


def test_a_guest_with_a_named_model_moves_between_hosts_of_different_cpus(tmp_path: pathlib.Path) -> None:
    """The target's host CPU is compared with the source's only for a guest that may run the source host's
    own CPU; a named model needs only to be listed by the target."""
    cluster = Cluster(tmp_path)
    reboot = {"reboot": {"id": "r", "type": "Hard"}}
    cluster.source.node.change("vm", cpu={"model": "Nehalem"}, actions=reboot)
    source = cluster.api.objects[(COMPUTENODES, None, "node-0")]["status"]["cpuInfo"]
    source["features"] = [*source["features"], "avx512-fake"]  # a newer source host
    cluster.start("Live")
    done = cluster.run()
    assert done["status"]["phase"] == "Succeeded", done["status"]["message"]
    assert cluster.target.node.state(cluster.uid).value == "Running"


# --- an upgrade: definitions of the previous format ----------------------------------------------


def made_by_the_previous_format(node: Node, uid: str) -> None:
    """The domain as an older kubenova defined it: its revision the previous format's digest."""
    inst = node.driver._instances[uid]
    body = node.get("vm")
    old = definition_digest(body["spec"], body["spec"]["flavor"], PREVIOUS_FORMAT)
    inst.spec = dataclasses.replace(inst.spec, revision=old)


def test_an_upgrade_redefines_each_domain_once_without_restart_required(node: Node) -> None:
    uid = node.create("vm")
    made_by_the_previous_format(node, uid)
    node.look(node.get("vm"))
    body = node.get("vm")
    assert node.driver.defined_revision(uid) == definition_digest(body["spec"], body["spec"]["flavor"])
    assert not condition(body, "RestartRequired") and condition(body, "Ready")["status"] == "True"


def test_an_upgrade_says_nothing_of_a_secret_gone_since_the_first_boot(node: Node) -> None:
    node.api.add_secret("ns", "pw", password="s3cret")
    uid = node.create("vm", adminPasswordSecretRef={"name": "pw"})
    del node.api.secrets[("ns", "pw")]  # hygiene after the first boot
    made_by_the_previous_format(node, uid)
    node.look(node.get("vm"))
    assert condition(node.get("vm"), "Ready")["status"] == "True", "the user asked for nothing"
    node.api.add_secret("ns", "pw", password="s3cret")
    node.look(node.get("vm"))
    body = node.get("vm")
    assert node.driver.defined_revision(uid) == definition_digest(body["spec"], body["spec"]["flavor"])
