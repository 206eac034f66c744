"""Opening, failing to open, losing and regaining a real SoftHSM2 token."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hsm import open_keystore
from hsm.pkcs11 import RECONNECT_INTERVAL, TokenConfigError
from kms.keystore import Digest, KeyRef, KeyStoreError, TokenUnavailable
from kms.mikey.prf import prf

PSK = bytes.fromhex("00112233445566778899aabbccddeeff")


def _until_ok(call: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except TokenUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_token_directory_lost_and_restored(softhsm_token: Any, tmp_path: Path) -> None:
    ks = open_keystore(softhsm_token.config())
    try:
        ks.import_secret("psk", PSK)
        ref = KeyRef("psk")
        expected = prf(PSK, b"label", 48, Digest.SHA1)
        assert ks.prf(ref, b"label", 48, Digest.SHA1) == expected

        moved = tmp_path / "tokens-moved-away"
        shutil.move(softhsm_token.tokens_dir, moved)
        # While the token is gone every call fails with TokenUnavailable: never a wrong
        # result, never KeyNotFound, never a crash. Long enough for several (rate-limited)
        # reconnect attempts to fail.
        deadline = time.monotonic() + 3 * RECONNECT_INTERVAL
        calls = 0
        while time.monotonic() < deadline:
            with pytest.raises(TokenUnavailable, match="token unavailable"):
                ks.prf(ref, b"label", 48, Digest.SHA1)
            with pytest.raises(TokenUnavailable):
                ks.hmac(os.urandom(16), b"x", Digest.SHA1)
            calls += 1
            time.sleep(0.05)
        assert calls >= 5
        assert not ks.connected

        shutil.move(moved, softhsm_token.tokens_dir)
        # Same store object: it reconnects by itself (finalise, initialise, log in, rescan).
        got = _until_ok(lambda: ks.prf(ref, b"label", 48, Digest.SHA1),
                        timeout=10 * RECONNECT_INTERVAL)
        assert got == expected
        assert ks.connected
        assert ks.key_info("psk").length_bits == 128
        # Management works again too.
        ks.generate_secret("after-restore", 16)
        assert "after-restore" in {k.label for k in ks.list_keys()}
    finally:
        ks.close()


def test_reconnect_attempts_are_rate_limited(softhsm_token: Any, tmp_path: Path) -> None:
    ks = open_keystore(softhsm_token.config())
    try:
        ks.import_secret("psk", PSK)
        shutil.move(softhsm_token.tokens_dir, tmp_path / "away")
        with pytest.raises(TokenUnavailable):
            ks.hmac(KeyRef("psk"), b"x", Digest.SHA1)  # marks the connection broken
        with pytest.raises(TokenUnavailable):
            ks.hmac(KeyRef("psk"), b"x", Digest.SHA1)  # one reconnect attempt: fails
        t0 = time.monotonic()
        for _ in range(50):  # inside the interval: refused at once, no token work
            with pytest.raises(TokenUnavailable):
                ks.hmac(KeyRef("psk"), b"x", Digest.SHA1)
        assert time.monotonic() - t0 < RECONNECT_INTERVAL
        shutil.move(tmp_path / "away", softhsm_token.tokens_dir)
        _until_ok(lambda: ks.hmac(KeyRef("psk"), b"x", Digest.SHA1), 10 * RECONNECT_INTERVAL)
    finally:
        ks.close()


def test_wrong_pin_is_a_clear_error_without_the_pin(softhsm_token: Any) -> None:
    wrong = "not-the-pin-9137"
    with pytest.raises(TokenConfigError, match="PIN") as ei:
        open_keystore(softhsm_token.config(pin=wrong))
    for text in (str(ei.value), repr(ei.value)):
        assert wrong not in text
        assert softhsm_token.user_pin not in text
    # The failed attempt left the module clean: the right PIN works in the same process.
    ks = open_keystore(softhsm_token.config())
    ks.close()


def test_missing_module_is_a_clear_error(softhsm_token: Any, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-pkcs11-module.so")
    with pytest.raises(TokenConfigError, match="module not found") as ei:
        open_keystore(softhsm_token.config(module=missing))
    assert missing in str(ei.value)


def test_not_a_pkcs11_module_is_a_clear_error(softhsm_token: Any, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"\x7fELF not really")
    with pytest.raises(TokenConfigError, match="module"):
        open_keystore(softhsm_token.config(module=str(bogus)))


def test_unknown_token_label_is_a_clear_error(softhsm_token: Any) -> None:
    with pytest.raises(TokenConfigError, match="no token matching label='no-such-token'"):
        open_keystore(softhsm_token.config(token_label="no-such-token"))


def test_token_by_serial(softhsm_token: Any) -> None:
    out = subprocess.run(
        ["softhsm2-util", "--show-slots"], env=softhsm_token.env(), capture_output=True,
        text=True, timeout=60, check=True,
    ).stdout
    serials = re.findall(r"Serial number:\s+(\S+)", out)
    assert serials
    cfg = softhsm_token.config(token_label=None, token_serial=serials[0])
    with open_keystore(cfg) as ks:
        ks.import_secret("by-serial", PSK)
        assert ks.key_info("by-serial").length_bits == 128
    with pytest.raises(TokenConfigError, match="no token matching serial"):
        open_keystore(softhsm_token.config(token_label=None, token_serial="0000"))


def test_config_needs_label_or_serial(softhsm_token: Any) -> None:
    with pytest.raises(TokenConfigError, match="token_label or token_serial"):
        open_keystore(softhsm_token.config(token_label=None))


def test_closed_store_refuses_calls(softhsm_token: Any) -> None:
    ks = open_keystore(softhsm_token.config())
    ks.close()
    ks.close()  # idempotent
    with pytest.raises(KeyStoreError, match="closed"):
        ks.random(8)
    assert "closed" in repr(ks)
