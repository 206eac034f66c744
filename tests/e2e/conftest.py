"""Fixtures for the end-to-end tests: ONE `kms serve` subprocess per test module, on a home
made with the operator CLI. Tests share it, so each uses its own tickets (and, where rates
or replays could interfere, its own identities)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from kms.home import open_home
from kms.store.registry import TpkState
from tests.e2e.harness import Kms, make_home, running_kms

#: Mode 2 (RFC 6043 4.1.1): a TPK that the KMS and the Responder share. The test installs it
#: as the KMS's current TPK before serving (there is no operator command to import a TPK:
#: `kms tpk rotate` makes one inside the token that nobody else knows).
MODE2_TPK = bytes.fromhex("5e" * 32)
MODE2_TPK_LABEL = "tpk/70"


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kms]:
    assert shutil.which("softhsm2-util"), "softhsm2-util is required (scripts/setup.sh)"
    home = make_home(tmp_path_factory.mktemp("e2e") / "home")
    with open_home(home) as h:
        h.keystore().import_secret(MODE2_TPK_LABEL, MODE2_TPK)
        h.registry.add_tpk_version(70, MODE2_TPK_LABEL, TpkState.CURRENT)
    with running_kms(home) as k:
        yield k
