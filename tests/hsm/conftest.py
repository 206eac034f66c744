"""SoftHSM2 token fixtures for the hsm tests (and anyone who needs a real throwaway token).

A test that uses these fixtures FAILS (never skips) when softhsm2-util or the SoftHSM module
is missing: the token boundary must be tested on every CI run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hsm import TokenConfig
from hsm.provision import DEFAULT_SOFTHSM_MODULE, create_softhsm_token
from tests.token_modules import OckToken

USER_PIN = "4711-user"
SO_PIN = "0815-so"


@dataclass(frozen=True)
class SoftToken:
    """A throwaway SoftHSM2 token in its own directory."""

    dir: Path
    conf: Path
    label: str
    user_pin: str = field(repr=False)
    so_pin: str = field(repr=False)
    module: str = DEFAULT_SOFTHSM_MODULE

    @property
    def tokens_dir(self) -> Path:
        return self.dir / "tokens"

    def config(self, **overrides: str | None) -> TokenConfig:
        kwargs: dict[str, str | None] = {
            "module": self.module,
            "token_label": self.label,
            "token_serial": None,
            "pin": self.user_pin,
            "softhsm_conf": str(self.conf),
        }
        kwargs.update(overrides)
        return TokenConfig(**kwargs)  # type: ignore[arg-type]

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (pkcs11-tool, softhsm2-util) that use this token."""
        env = dict(os.environ)
        env["SOFTHSM2_CONF"] = str(self.conf)
        return env


@pytest.fixture(scope="session")
def new_softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], SoftToken]:
    """Factory: ``new_softhsm_token(label)`` creates a fresh token (usable at any scope)."""
    if not os.path.exists(DEFAULT_SOFTHSM_MODULE):
        pytest.fail(f"SoftHSM2 module not found at {DEFAULT_SOFTHSM_MODULE} (install softhsm2)")

    def make(label: str) -> SoftToken:
        d = tmp_path_factory.mktemp(f"softhsm-{label}")
        conf = create_softhsm_token(d, label, SO_PIN, USER_PIN)
        return SoftToken(d, conf, label, USER_PIN, SO_PIN)

    return make


@pytest.fixture
def softhsm_token(new_softhsm_token: Callable[[str], SoftToken]) -> SoftToken:
    """A fresh token for one test."""
    return new_softhsm_token("kms-test")


def token_on(module: str, request: pytest.FixtureRequest, label: str) -> SoftToken | OckToken:
    """A token on ``module`` ("softhsm2": a fresh one; "opencryptoki": the session's)."""
    if module == "softhsm2":
        make: Callable[[str], SoftToken] = request.getfixturevalue("new_softhsm_token")
        return make(label)
    assert module == "opencryptoki", module
    token: OckToken = request.getfixturevalue("ock_token")
    return token
