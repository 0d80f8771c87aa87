"""The typed views in kubenova.api match the CRDs field for field, and docs/api.md is current."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import typing
from typing import Any

import pytest
import yaml

from kubenova import api

REPO = pathlib.Path(__file__).resolve().parents[2]
SCALARS = {"string": str, "integer": int, "boolean": bool}


def crds() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted((REPO / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        found[crd["spec"]["names"]["kind"]] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return found


def compare(schema: dict[str, Any], hint: Any, path: str) -> list[str]:
    """Differences between one schema node and one type hint, recursively."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    kind = schema.get("type")
    if kind in SCALARS:
        return [] if hint is SCALARS[kind] else [f"{path}: schema {kind}, type {hint}"]
    if kind == "array":
        if origin is not list:
            return [f"{path}: schema array, type {hint}"]
        return compare(schema["items"], args[0], f"{path}[]")
    if "additionalProperties" in schema:
        if origin is not dict:
            return [f"{path}: schema map, type {hint}"]
        return compare(schema["additionalProperties"], args[1], f"{path}{{}}")
    if not typing.is_typeddict(hint):
        return [f"{path}: schema object, type {hint}"]
    hints = typing.get_type_hints(hint)
    props = schema.get("properties", {})
    problems = [f"{path}.{k}: in the CRD only" for k in props.keys() - hints.keys()]
    problems += [f"{path}.{k}: in kubenova.api only" for k in hints.keys() - props.keys()]
    for key in props.keys() & hints.keys():
        problems += compare(props[key], hints[key], f"{path}.{key}")
    return problems


@pytest.mark.parametrize("kind", sorted(api.VIEWS))
def test_typed_views_match_the_crd(kind: str) -> None:
    schema = crds()[kind]["properties"]
    spec, status = api.VIEWS[kind]
    assert compare(schema["spec"], spec, "spec") + compare(schema["status"], status, "status") == []


def test_every_crd_has_typed_views() -> None:
    assert sorted(crds()) == sorted(api.VIEWS)


def test_every_field_has_a_description() -> None:
    def undocumented(schema: dict[str, Any], path: str) -> list[str]:
        missing = [] if schema.get("description") else [path]
        for name, child in (schema.get("properties") or {}).items():
            if name != "metadata":  # the apiserver allows nothing but the type here
                missing += undocumented(child, f"{path}.{name}")
        if "items" in schema:
            missing += [p for p in undocumented(schema["items"], f"{path}[]") if p != f"{path}[]"]
        return missing

    for kind, schema in crds().items():
        assert undocumented(schema, kind) == []


def test_api_docs_are_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "hack" / "gen_api_docs.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
