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
    for name in imports_of(ROOT / "kms" / "keystore.py"):
        assert top(name) in STDLIB or name.startswith("kms.mikey"), name
    for p in modules("hsm"):
        for name in imports_of(p):
            assert not name.startswith(("kms.core", "kms.server", "kms.store", "kms.cli")), (
                f"{p.relative_to(ROOT)} imports {name}"
            )


def test_endpoint_library_does_not_depend_on_the_kms() -> None:
    for p in modules("kms.endpoint"):
        for name in imports_of(p):  # the wire contract comes from kms.rpc, not the server
            assert not name.startswith(("kms.core", "kms.server", "kms.store", "hsm.pkcs11")), (
                f"{p.relative_to(ROOT)} imports {name}"
            )


def test_wire_contract_stands_alone() -> None:
    # kms.rpc (stubs and metadata keys) is shared by server and endpoint library: it imports
    # grpc, protobuf and nothing else of the project.
    for p in modules("kms.rpc"):
        for name in imports_of(p):
            assert top(name) in STDLIB | {"grpc", "google"} or name.startswith("kms.rpc"), (
                f"{p.relative_to(ROOT)} imports {name}"
            )


def _module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imported_modules(path: Path) -> set[str]:
    """Like :func:`imports_of`, plus ``M.N`` for ``from M import N`` (N may be a module)."""
    names = imports_of(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def cycles(paths: list[Path], root: Path = ROOT) -> list[list[str]]:
    """Import cycles among ``paths`` (every import statement counts, also those inside
    functions: deferring an import hides a cycle, it does not remove it)."""
    graph: dict[str, set[str]] = {_module_name(p, root): set() for p in paths}
    for p in paths:
        me = _module_name(p, root)
        graph[me] = {n for n in _imported_modules(p) if n in graph and n != me}
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


@pytest.mark.parametrize("package", ["kms.mikey", "kms.endpoint", "kms.rpc"])
def test_no_import_cycles(package: str) -> None:
    assert cycles(modules(package)) == []


def test_cycle_check_sees_deferred_imports(tmp_path: Path) -> None:
    # The checker itself: a cycle through an import inside a function is found.
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "a.py").write_text("from p.b import x\n", encoding="utf-8")
    (pkg / "b.py").write_text("def x() -> None:\n    from p import a\n", encoding="utf-8")
    (pkg / "c.py").write_text("import p.a\n", encoding="utf-8")
    paths = sorted(pkg.glob("*.py"))
    assert cycles(paths, tmp_path) == [["p.a", "p.b", "p.a"]]
    (pkg / "b.py").write_text("def x() -> None:\n    import p.c\n", encoding="utf-8")
    assert cycles(paths, tmp_path) == [["p.a", "p.b", "p.c", "p.a"]]
    (pkg / "c.py").write_text("", encoding="utf-8")
    assert cycles(paths, tmp_path) == []
