"""PIN sources, TokenConfig redaction and SoftHSM provisioning."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hsm import PinError, TokenConfig, read_pin
from hsm.provision import (
    DEFAULT_SOFTHSM_MODULE,
    ProvisioningError,
    create_softhsm_token,
)
from kms.keystore import KeyStoreError

SECRET_PIN = "pin-7c1e-secret"


def test_pin_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMS_TEST_PIN", SECRET_PIN)
    assert read_pin("KMS_TEST_PIN", None) == SECRET_PIN


@pytest.mark.parametrize("ending", ["", "\n", "\r\n"])
def test_pin_from_file(tmp_path: Path, ending: str) -> None:
    f = tmp_path / "pin"
    f.write_bytes((SECRET_PIN + ending).encode())
    assert read_pin(None, str(f)) == SECRET_PIN


def test_pin_env_falls_back_to_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMS_TEST_PIN_UNSET", raising=False)
    f = tmp_path / "pin"
    f.write_text(SECRET_PIN + "\n")
    assert read_pin("KMS_TEST_PIN_UNSET", str(f)) == SECRET_PIN


def test_missing_pin_errors_never_show_a_pin(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMS_TEST_PIN_UNSET", raising=False)
    monkeypatch.setenv("KMS_TEST_PIN_EMPTY", "")
    cases = [
        (None, None),
        ("KMS_TEST_PIN_UNSET", None),
        ("KMS_TEST_PIN_EMPTY", None),
        (None, str(tmp_path / "missing")),
    ]
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases.append((None, str(empty)))
    for env, path in cases:
        with pytest.raises(PinError) as ei:
            read_pin(env, path)
        assert isinstance(ei.value, KeyStoreError)
        assert isinstance(ei.value, ValueError)
        assert SECRET_PIN not in str(ei.value)


def test_token_config_repr_hides_the_pin() -> None:
    cfg = TokenConfig(DEFAULT_SOFTHSM_MODULE, "label", None, SECRET_PIN, None)
    assert SECRET_PIN not in repr(cfg)
    assert SECRET_PIN not in str(cfg)
    assert cfg.pin == SECRET_PIN


def test_default_module_exists() -> None:
    # FAILS (not skips) without SoftHSM2: the token tests need it.
    assert os.path.exists(DEFAULT_SOFTHSM_MODULE), DEFAULT_SOFTHSM_MODULE


def test_create_token_writes_conf(tmp_path: Path) -> None:
    conf = create_softhsm_token(tmp_path / "t", "conf-test", "so-pin-1", "user-pin-1")
    assert conf == (tmp_path / "t" / "softhsm2.conf").resolve()
    text = conf.read_text()
    assert f"directories.tokendir = {(tmp_path / 't' / 'tokens').resolve()}" in text
    assert "objectstore.backend = file" in text
    assert "log.level = ERROR" in text
    assert any((tmp_path / "t" / "tokens").iterdir())  # the token's own directory
    assert "user-pin-1" not in text


def test_create_token_without_softhsm2_util(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ProvisioningError, match="softhsm2-util not found"):
        create_softhsm_token(tmp_path / "t", "x", "so-pin-1", "user-pin-1")


def test_create_token_failure_hides_pins(tmp_path: Path) -> None:
    # softhsm2-util refuses PINs shorter than 4 characters.
    with pytest.raises(ProvisioningError, match="failed") as ei:
        create_softhsm_token(tmp_path / "t", "x", "q7", "user-pin-zz81")
    assert "user-pin-zz81" not in str(ei.value)
