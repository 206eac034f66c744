"""Dependencies point inward (docs/design.md): checked on the import statements of every
module, so that a stray import fails CI instead of eroding the architecture."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", modules("kms.mikey"), ids=lambda p: p.name)
def test_mikey_is_pure(path: Path) -> None:
    # stdlib, cryptography, itself and the key-store interface; nothing that does I/O.
    for name in imports_of(path):
        ok = (
            top(name) in STDLIB
            or top(name) == "cryptography"
            or name.startswith("kms.mikey")
            or name == "kms.keystore"
        )
        assert ok, f"{path.relative_to(ROOT)} imports {name}"
        assert top(name) not in {"socket", "grpc", "pkcs11", "sqlite3", "subprocess"}


@pytest.mark.parametrize("path", modules("kms.core"), ids=lambda p: p.name)
def test_core_is_sans_io(path: Path) -> None:
    for name in imports_of(path):
        assert top(name) not in {"grpc", "pkcs11", "socket", "sqlite3", "time", "hsm"}, (
            f"{path.relative_to(ROOT)} imports {name}"
        )
        assert not name.startswith(("kms.server", "kms.store", "kms.cli", "kms.endpoint")), (
            f"{path.relative_to(ROOT)} imports {name}"
        )


def test_only_hsm_imports_python_pkcs11() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for pkg in ("kms", "bench")
        for p in modules(pkg)
        if any(top(n) == "pkcs11" for n in imports_of(p))
    ]
    assert offenders == []
    assert any(top(n) == "pkcs11" for n in imports_of(ROOT / "hsm" / "pkcs11_store.py"))


def test_keystore_interface_and_hsm_point_inward() -> None:
    # The boundary is interfaces only: the MIKEY PRF (which PRF func uses which HMAC digest)
    # stays in kms.mikey, the boundary names digests itself.
    for name in imports_of(ROOT / "kms" / "keystore.py"):
        assert top(name) in STDLIB, name
    for p in modules("hsm"):
        for name in imports_of(p):
            assert not name.startswith(("kms.core", "kms.server", "kms.store", "kms.cli")), (
                f"{p.relative_to(ROOT)} imports {name}"
            )


def test_endpoint_library_does_not_depend_on_the_kms() -> None:
    for p in modules("kms.endpoint"):
        for name in imports_of(p) - {"kms.server.stubs"}:  # the generated wire contract only
            assert not name.startswith(("kms.core", "kms.server", "kms.store", "hsm.pkcs11")), (
                f"{p.relative_to(ROOT)} imports {name}"
            )


def names_imported_from(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return {
        a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == module
        for a in node.names
    }


@pytest.mark.parametrize(
    "path", modules("kms.core") + modules("kms.mikey") + modules("kms.endpoint"),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_request_path_uses_only_the_key_operations(path: Path) -> None:
    # The core, the MIKEY layer and the endpoint library compute with keys; creating,
    # importing, listing and deleting keys (KeyAdmin) belong to the CLI and the home.
    used = names_imported_from(path, "kms.keystore")
    assert not used & {"KeyStore", "KeyAdmin"}, f"{path.relative_to(ROOT)} imports {used}"
