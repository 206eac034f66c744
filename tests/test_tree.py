"""The tests mirror the source tree: tests/<pkg>/ holds the tests of package kms/<pkg> (or
hsm/), and the few folders that test across packages are named here. The core's own tests
run the core without a token, on the software key store and the in-memory ports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

# Folders that test several packages together, or hold data rather than tests.
CROSS_CUTTING = {
    "cluster": "replicas on one token and PostgreSQL stores (kms serve + kms store)",
    "deploy": "the files under deploy/ (Kubernetes, HAProxy)",
    "e2e": "the kms command line against a running KMS, endpoint to endpoint",
    "federation": "several KMS domains resolving each other's tickets",
    "observability": "metrics, alerts and traces across the server and a real Prometheus",
    "vectors": "test vectors (data, no tests)",
}

# What a core or endpoint test may import: the core, what it is built on, and the token-free
# implementations of its ports.
CORE_TEST_IMPORTS = (
    "kms.core",
    "kms.mikey",
    "kms.endpoint",
    "kms.keystore",
    "kms.store.memory",
    "hsm.software",
    "tests.core",
)


def source_packages() -> set[str]:
    found = {"hsm"} if (ROOT / "hsm" / "__init__.py").is_file() else set()
    found |= {p.parent.name for p in (ROOT / "kms").glob("*/__init__.py")}
    return found


def folders_of_tests() -> list[str]:
    return sorted(
        p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
    )


@pytest.mark.parametrize("folder", folders_of_tests())
def test_every_test_folder_mirrors_a_package_or_is_listed(folder: str) -> None:
    assert folder in source_packages() or folder in CROSS_CUTTING, (
        f"tests/{folder}/ matches no package under kms/ or hsm/: move its tests to the "
        "folder of the package they test, or list it in CROSS_CUTTING"
    )


def test_listed_folders_exist_and_do_not_shadow_a_package() -> None:
    folders = set(folders_of_tests())
    assert set(CROSS_CUTTING) <= folders, set(CROSS_CUTTING) - folders
    assert not set(CROSS_CUTTING) & source_packages()


# Test modules at the top of tests/: only those about the whole tree.
TREE_WIDE = {"test_layering.py", "test_one_place.py", "test_tree.py"}


def test_only_tree_wide_tests_sit_at_the_top() -> None:
    top = {p.name for p in TESTS.glob("test_*.py")}
    assert top == TREE_WIDE, f"move {sorted(top - TREE_WIDE)} to the folder of its package"


def test_the_request_path_packages_have_their_tests() -> None:
    for pkg in ("core", "endpoint", "mikey", "server", "store", "hsm", "cli", "rpc"):
        assert any((TESTS / pkg).glob("test_*.py")), f"tests/{pkg}/ has no tests"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


TOKEN_FREE = ("core", "endpoint")


@pytest.mark.parametrize(
    "path",
    sorted(p for folder in TOKEN_FREE for p in (TESTS / folder).glob("*.py")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_core_and_endpoint_tests_need_no_token_and_no_home(path: Path) -> None:
    for name in imports_of(path):
        if name.split(".")[0] not in {"kms", "hsm", "tests", "pkcs11"}:
            continue  # stdlib, pytest, hypothesis, cryptography
        assert name.startswith(CORE_TEST_IMPORTS), (
            f"tests/{path.parent.name}/{path.name} imports {name}: exchanges that need the "
            "token or a KMS home belong in tests/server (see tests/server/world.py)"
        )
