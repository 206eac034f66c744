"""One place per fact: enums and wire keys defined once in the source tree.

``IdType`` (RFC 6043 6.6 ID Type) lives in kms.mikey.constants; the gRPC metadata keys shared
by the server and the endpoint library (the MIKEY error trailer, the correlation id and the
federation hop count) live in kms.rpc; kms.toml defaults live in kms.server.settings.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for pkg in ("kms", "hsm", "bench") for p in (ROOT / pkg).rglob("*.py"))
WIRE_KEYS = {"mikey-error-bin", "x-correlation-id", "mikey-hops"}


def _classes(name: str) -> list[str]:
    return [
        str(p.relative_to(ROOT))
        for p in SOURCES
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(node, ast.ClassDef) and node.name == name
    ]


def test_one_id_type() -> None:
    assert _classes("IdType") == ["kms/mikey/constants.py"]


def test_wire_metadata_keys_are_defined_only_in_kms_rpc() -> None:
    found: dict[str, list[str]] = {}
    for p in SOURCES:
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in WIRE_KEYS:
                found.setdefault(str(node.value), []).append(str(p.relative_to(ROOT)))
    assert found == {key: ["kms/rpc/__init__.py"] for key in WIRE_KEYS}


def test_settings_enums_are_defined_once() -> None:
    for name in ("Forking", "PrfName", "KeyTypeName", "Responders", "StoreBackend",
                 "RsaPadding"):
        assert len(_classes(name)) == 1, name
