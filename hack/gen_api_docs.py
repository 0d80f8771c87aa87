#!/usr/bin/env python3
"""Writes docs/api.md from the CRDs in crds/, the API's single source of truth.

`--check` exits 1 when docs/api.md is stale (CI runs it through the test suite).
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "api.md"
ORDER = ["VirtualInstance", "VolumeAttachment", "Migration", "ComputeNode"]
#: What the schema cannot say, written once here and placed after a kind's table.
#: How a change of each VirtualInstance field reaches a running domain (a table in docs/api.md).
APPLIES = [
    ("`spec.flavor` (vCPUs, memory)", "next boot (`RestartRequired`)"),
    ("`spec.boot.kernel` (kernel, initrd, cmdline)", "next boot (`RestartRequired`)"),
    (
        "`spec.cpu.model`",
        "next boot (`RestartRequired`); a model the node cannot give fails the instance, naming the field",
    ),
    ("`spec.boot.image`", "fixed at creation (the root disk is made from it); refused at apply time"),
    (
        "`spec.rootDisk.sizeGiB`, `spec.ephemeralDisks[].sizeGiB`, `spec.swap.sizeMiB`",
        "grow at once, live while the guest runs (it sees the new size); shrinking is refused at apply time",
    ),
    (
        "an added or removed `spec.rootDisk`, ephemeral disk or `spec.swap`",
        "next boot (`RestartRequired`); a removed disk's file stays until the instance is deleted",
    ),
    (
        "`spec.interfaces`",
        "next boot (`RestartRequired`); each interface keeps its MAC (`status.interfaces`)",
    ),
    (
        "`spec.userData`, `spec.userDataSecretRef`, `spec.networkConfig`, `spec.injectedFiles`, "
        "`spec.adminPasswordSecretRef`",
        "the config drive is rewritten for the next boot (`RestartRequired`); cloud-init runs its "
        "per-instance modules once per instance, so most of them act only on a new instance",
    ),
    ("`spec.powerState`, `spec.rescue`, `spec.actions`", "at once"),
    ("`spec.nodeSelector`", "placement only: a placed instance stays where it is (move it with a Migration)"),
    ("`spec.nodeName`, `spec.vnc`", "immutable"),
]
NOTES = {
    "VirtualInstance": """### Changing a running instance

kubenova never reports a spec as applied while the domain runs something else. A change the running
domain cannot take is defined for its next boot at once, and the condition `RestartRequired` names the
fields until a boot takes them: stop and start the instance, or request a `Hard` reboot (a `Soft` one
also does when the guest powers off on ACPI; a reboot from inside the guest keeps the running
definition). `status.flavor` always shows the size the domain runs with, and so do the `kubectl get -o
wide` columns; `status.observedGeneration` says the agent has seen the spec.

{applies}

A MAC address is kept for the instance's whole life: an interface without `macAddress` gets one derived
from the instance's UID and the interface's name (locally administered, unicast), the same on every
node, so live and cold migration, rescue, restarts and resizes never change it.
""".format(
        applies="\n".join(
            [
                "| field | how a change applies |",
                "| --- | --- |",
                *(f"| {field} | {how} |" for field, how in APPLIES),
            ]
        )
    )
}


def _constraints(schema: dict[str, Any]) -> str:
    parts = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    for key, word in (
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("minLength", "length ≥"),
        ("maxLength", "length ≤"),
        ("maxItems", "items ≤"),
        ("maxProperties", "entries ≤"),
    ):
        if key in schema:
            parts.append(f"{word} {schema[key]}")
    if "pattern" in schema:
        parts.append(f"pattern `{schema['pattern']}`")
    if "format" in schema:
        parts.append(f"format {schema['format']}")
    if "default" in schema:
        parts.append(f"default `{schema['default']}`")
    if schema.get("x-kubernetes-list-type") == "map":
        parts.append("unique by " + ", ".join(schema["x-kubernetes-list-map-keys"]))
    for rule in schema.get("x-kubernetes-validations", []):
        parts.append(f"rule: {rule['message']}")
    return "; ".join(parts).replace("|", "\\|")


def _fields(schema: dict[str, Any], path: str, required: bool) -> Iterator[str]:
    kind = schema.get("type", "")
    if kind == "array":
        kind = f"[]{schema['items'].get('type', '')}"
    elif kind == "object" and "additionalProperties" in schema:
        kind = f"map[string]{schema['additionalProperties'].get('type', '')}"
    desc = schema.get("description", "").replace("|", "\\|").replace("\n", " ")
    yield f"| `{path}` | {kind}{' (required)' if required else ''} | {desc} | {_constraints(schema)} |"
    children = schema.get("properties") or (schema.get("items") or {}).get("properties") or {}
    needed = set(schema.get("required") or (schema.get("items") or {}).get("required") or [])
    suffix = "[]" if schema.get("type") == "array" else ""
    for name, child in children.items():
        yield from _fields(child, f"{path}{suffix}.{name}", name in needed)


def render(crd_dir: pathlib.Path = REPO / "crds") -> str:
    crds = [yaml.safe_load(p.read_text()) for p in sorted(crd_dir.glob("*.yaml"))]
    crds.sort(key=lambda c: ORDER.index(c["spec"]["names"]["kind"]))
    lines = [
        "<!-- Generated by hack/gen_api_docs.py from crds/; do not edit by hand. -->",
        "# kubenova API: `compute.kubenova.io/v1alpha1`",
        "",
        "Every kind is in the category `kubenova`: `kubectl get kubenova` lists them all, and",
        "`kubectl explain <kind>.spec` shows the same descriptions as below.",
        "",
    ]
    for crd in crds:
        names, version = crd["spec"]["names"], crd["spec"]["versions"][0]
        schema = version["schema"]["openAPIV3Schema"]
        lines += [
            f"## {names['kind']}",
            "",
            schema.get("description", ""),
            "",
            f"- scope: {crd['spec']['scope']}; plural `{names['plural']}`; short names "
            + ", ".join(f"`{s}`" for s in names.get("shortNames", [])),
            "- printer columns: " + ", ".join(c["name"] for c in version.get("additionalPrinterColumns", [])),
        ]
        if version.get("selectableFields"):
            lines.append(
                "- field selectors: "
                + ", ".join(f"`{f['jsonPath'][1:]}`" for f in version["selectableFields"])
            )
        lines += ["", "| field | type | description | validation |", "| --- | --- | --- | --- |"]
        for part in ("spec", "status"):
            if part in schema["properties"]:
                lines += _fields(schema["properties"][part], part, part in schema.get("required", []))
        lines.append("")
        if names["kind"] in NOTES:
            lines += [NOTES[names["kind"]]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python hack/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
