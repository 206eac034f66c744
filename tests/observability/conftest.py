"""One `kms serve` with two worker processes and a `/metrics` listener per module, on a home
made with the operator CLI (tests.e2e.harness)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.harness import Kms, free_port, make_home, running_kms


@dataclass
class Observed:
    kms: Kms
    metrics_port: int


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    assert shutil.which("softhsm2-util"), "softhsm2-util is required (scripts/setup.sh)"
    home = make_home(tmp_path_factory.mktemp("obs") / "home")
    port = free_port()
    with running_kms(
        home, "--workers", "2", "--metrics-listen", f"127.0.0.1:{port}"
    ) as k:
        yield Observed(k, port)
