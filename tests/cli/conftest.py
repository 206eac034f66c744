"""Fixtures for the operator CLI tests: one real ``kms init`` per session, copied per test.

RSA key generation makes ``init`` the slow step, so a pristine home is initialised once and
each test that mutates gets its own copy (the token files are copied too, so the copies are
independent tokens).
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

KMS_ID = "kms:kms.example.org"
REPO = Path(__file__).resolve().parents[2]

Run = Callable[..., subprocess.CompletedProcess[str]]


def _run(home: Path, *args: str | bytes, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "kms.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="session")
def kms() -> Run:
    """kms(home, *args) -> CompletedProcess; asserts success (use kms_fails for errors)."""

    def run(home: Path, *args: str | bytes, env: dict[str, str] | None = None) -> Any:
        proc = _run(home, *args, env=env)
        assert proc.returncode == 0, f"kms {args} failed: {proc.stderr}"
        assert "Traceback" not in proc.stderr
        return proc

    return run


@pytest.fixture(scope="session")
def kms_fails() -> Callable[..., str]:
    """kms_fails(home, *args, match=REGEX, secrets=[...]) -> the one-line error message."""

    def run(
        home: Path, *args: str | bytes, match: str, secrets: tuple[str, ...] = ()
    ) -> str:
        proc = _run(home, *args)
        assert proc.returncode == 1, f"expected failure, got {proc.returncode}: {proc.stdout}"
        err: str = proc.stderr
        assert "Traceback" not in err
        lines = [ln for ln in err.splitlines() if not ln.startswith("kms init: ")]
        assert len(lines) == 1, err
        assert lines[0].startswith("kms: error: "), err
        assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"
        for s in secrets:
            assert s not in err
            assert s not in proc.stdout
        return lines[0]

    return run


def copy_home(src: Path, dst: Path) -> Path:
    """Copy a KMS home; point the copy's softhsm2.conf at the copied token directory."""
    shutil.copytree(src, dst, symlinks=True)
    conf = dst / "token" / "softhsm2.conf"
    text = conf.read_text()
    text = re.sub(
        r"^directories\.tokendir = .*$",
        f"directories.tokendir = {dst / 'token' / 'tokens'}",
        text,
        flags=re.MULTILINE,
    )
    conf.write_text(text)
    return dst


@pytest.fixture(scope="session")
def pristine_home(tmp_path_factory: pytest.TempPathFactory, kms: Run) -> Path:
    # SoftHSM is part of the test environment: a missing softhsm2-util fails, never skips.
    assert shutil.which("softhsm2-util"), "softhsm2-util is required (scripts/setup.sh)"
    home = tmp_path_factory.mktemp("pristine") / "home"
    kms(home, "init", "--kms-id", KMS_ID)
    return home


@pytest.fixture
def home(pristine_home: Path, tmp_path: Path) -> Path:
    return copy_home(pristine_home, tmp_path / "home")


def registry_dump(home: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every registry table (read directly, not through the code under test)."""
    conn = sqlite3.connect(f"file:{home / 'registry.sqlite3'}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}
    finally:
        conn.close()


@pytest.fixture(scope="session")
def registry_rows() -> Callable[[Path], dict[str, list[tuple[Any, ...]]]]:
    return registry_dump


@pytest.fixture(scope="session")
def snapshot(kms: Run) -> Callable[[Path], Any]:
    """What must not change after a failed command: every registry row (read directly, which
    covers what `kms endpoint list` shows), the token objects as `kms keys list` shows them,
    and the home's files."""

    def take(home: Path) -> Any:
        keys = json.loads(kms(home, "keys", "list", "--json").stdout)
        files = sorted(p.name for p in home.iterdir())
        return {"registry": registry_dump(home), "keys": keys, "files": files}

    return take
