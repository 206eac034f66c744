"""Tests for kms.mikey.cipher (RFC 3830 4.2.3, RFC 6043 5.1; docs/rfc-readings.md R6, V1;
RFC 3394 4; RFC 2202; RFC 4231)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap as lib_unwrap
from cryptography.hazmat.primitives.keywrap import aes_key_wrap as lib_wrap
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.mikey.cipher import (
    KW_DEFAULT_IV,
    CryptoError,
    aes_cm_iv,
    aes_key_unwrap,
    aes_key_wrap,
    compute_mac,
    decrypt_kemac_data,
    encrypt_kemac_data,
    software_aes_cm,
    verify_mac,
)
from kms.mikey.constants import EncrAlg, MacAlg, TsType
from kms.mikey.derive import KeyDirection, derive_message_keys
from kms.mikey.ntp import timestamp_t64
from kms.mikey.prf import PrfFunc, software_prf

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "reference_s11.json").read_text()
)
AES: dict[str, str] = VECTORS["aes_cm"]
INPUTS: dict[str, Any] = VECTORS["inputs"]

KEK = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
KW_DATA = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
KW_OUT = bytes.fromhex("1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5")


def ecb_block(key: bytes, block: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def reference_wrap(kek: bytes, iv: bytes, plaintext: bytes) -> bytes:
    """RFC 3394 2.2.1, the shifting formulation (independent of the indexed one in cipher.py)."""
    a = iv
    r = [plaintext[i : i + 8] for i in range(0, len(plaintext), 8)]
    n = len(r)
    for t in range(1, 6 * n + 1):
        b = ecb_block(kek, a + r[0])
        a = (int.from_bytes(b[:8], "big") ^ t).to_bytes(8, "big")
        r = [*r[1:], b[8:]]
    return a + b"".join(r)


# --- section 11 AES-CM vector -----------------------------------------------------------------


def section11_keys() -> tuple[bytes, bytes]:
    keys = derive_message_keys(
        software_prf(bytes.fromhex(INPUTS["key"]), PrfFunc.MIKEY_1),
        int(INPUTS["csb_id"], 16),
        KeyDirection.RESPONSE,
        bytes.fromhex(INPUTS["rand"]),
        None,
        EncrAlg.AES_CM_128,
        MacAlg.HMAC_SHA_1_160,
    )
    return keys.encr_key, keys.salt_key


def test_section11_iv() -> None:
    _, salt = section11_keys()
    t64 = timestamp_t64(TsType(int(AES["ts_type"])), bytes.fromhex(AES["ts_value"]))
    assert t64 == bytes.fromhex(AES["t64"])
    iv = aes_cm_iv(salt, int(AES["csb_id"], 16), t64)
    assert iv == bytes.fromhex("fd16ebfb0ff6a23350e882608d8b0000")
    assert iv.hex() == AES["iv"]


def test_section11_ciphertext() -> None:
    encr, salt = section11_keys()
    csb_id = int(AES["csb_id"], 16)
    t64 = bytes.fromhex(AES["t64"])
    plaintext = bytes.fromhex("00 61 0010 404142434445464748494a4b4c4d4e4f 04 00000001")
    assert plaintext.hex() == AES["plaintext"]
    expected = bytes.fromhex("948e54d17b3625064f9d4476457465bf8c352df796480a57d9")
    assert expected.hex() == AES["ciphertext"]
    ct = encrypt_kemac_data(EncrAlg.AES_CM_128, encr, salt, csb_id, t64, plaintext)
    assert ct == expected
    assert decrypt_kemac_data(EncrAlg.AES_CM_128, encr, salt, csb_id, t64, ct) == plaintext
    assert software_aes_cm(encr, bytes.fromhex(AES["iv"]), plaintext) == expected


def test_aes_cm_delegates_to_given_function() -> None:
    encr, salt = section11_keys()
    seen: list[tuple[bytes, bytes, bytes]] = []

    def fake(key: bytes, iv: bytes, data: bytes) -> bytes:
        seen.append((key, iv, data))
        return b"X" * len(data)

    ct = encrypt_kemac_data(
        EncrAlg.AES_CM_128, encr, salt, 0xA1B2C3D4, bytes.fromhex(AES["t64"]), b"abc", fake
    )
    assert ct == b"XXX"
    assert seen == [(encr, bytes.fromhex(AES["iv"]), b"abc")]


# --- AES-CM details -----------------------------------------------------------------------------


@settings(max_examples=50)
@given(
    salt=st.binary(min_size=14, max_size=14),
    csb_id=st.integers(min_value=0, max_value=0xFFFFFFFF),
    t64=st.binary(min_size=8, max_size=8),
)
def test_iv_byte_view(salt: bytes, csb_id: int, t64: bytes) -> None:
    iv = aes_cm_iv(salt, csb_id, t64)
    assert len(iv) == 16
    assert iv[0:2] == salt[0:2]
    assert iv[2:6] == bytes(
        a ^ b for a, b in zip(salt[2:6], csb_id.to_bytes(4, "big"), strict=True)
    )
    assert iv[6:14] == bytes(a ^ b for a, b in zip(salt[6:14], t64, strict=True))
    assert iv[14:16] == b"\x00\x00"


@pytest.mark.parametrize(
    ("salt", "csb_id", "t64"),
    [(bytes(13), 0, bytes(8)), (bytes(14), 0, bytes(4)), (bytes(14), 1 << 32, bytes(8))],
)
def test_iv_argument_errors(salt: bytes, csb_id: int, t64: bytes) -> None:
    with pytest.raises(ValueError, match=r"bytes|bits"):
        aes_cm_iv(salt, csb_id, t64)


@pytest.mark.parametrize("key_len", [16, 32])
def test_aes_cm_keystream_is_aes_of_counter_blocks(key_len: int) -> None:
    key = bytes(range(key_len))
    iv = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    stream = software_aes_cm(key, iv, bytes(48))
    for i in range(3):
        block = ((int.from_bytes(iv, "big") + i) % (1 << 128)).to_bytes(16, "big")
        assert stream[16 * i : 16 * (i + 1)] == ecb_block(key, block)


def test_aes_cm_counter_wraps_mod_2_128() -> None:
    key = bytes(16)
    stream = software_aes_cm(key, b"\xff" * 16, bytes(32))
    assert stream[16:] == ecb_block(key, bytes(16))


def test_aes_cm_argument_errors() -> None:
    with pytest.raises(ValueError, match="16 or 32"):
        software_aes_cm(bytes(24), bytes(16), b"x")
    with pytest.raises(ValueError, match="IV"):
        software_aes_cm(bytes(16), bytes(12), b"x")
    with pytest.raises(ValueError, match="wrong length"):
        encrypt_kemac_data(EncrAlg.AES_CM_256, bytes(16), bytes(14), 0, bytes(8), b"x")
    with pytest.raises(ValueError, match="wrong length"):
        decrypt_kemac_data(EncrAlg.AES_CM_128, bytes(32), bytes(14), 0, bytes(8), b"x")


def test_null_is_identity() -> None:
    data = b"\x00\x61plain"
    assert encrypt_kemac_data(EncrAlg.NULL, b"", b"", 0, bytes(8), data) == data
    assert decrypt_kemac_data(EncrAlg.NULL, b"", b"", 0, bytes(8), data) == data


# --- AES key wrap (RFC 3394) ---------------------------------------------------------------------


def test_rfc3394_4_1_vector() -> None:
    assert KW_DEFAULT_IV.hex() == "a6a6a6a6a6a6a6a6"
    assert aes_key_wrap(KEK, KW_DEFAULT_IV, KW_DATA) == KW_OUT
    assert aes_key_unwrap(KEK, KW_DEFAULT_IV, KW_OUT) == KW_DATA
    # Through the KEMAC entry points, with salt_key as the IV.
    assert encrypt_kemac_data(EncrAlg.AES_KW_128, KEK, KW_DEFAULT_IV, 0, bytes(8), KW_DATA) == (
        KW_OUT
    )
    assert decrypt_kemac_data(EncrAlg.AES_KW_128, KEK, KW_DEFAULT_IV, 0, bytes(8), KW_OUT) == (
        KW_DATA
    )


@settings(max_examples=50, deadline=None)
@given(
    kek=st.binary(min_size=16, max_size=16),
    blocks=st.integers(min_value=2, max_value=12),
    seed=st.binary(min_size=96, max_size=96),
)
def test_wrap_matches_cryptography_for_default_iv(kek: bytes, blocks: int, seed: bytes) -> None:
    data = seed[: 8 * blocks]
    wrapped = aes_key_wrap(kek, KW_DEFAULT_IV, data)
    assert wrapped == lib_wrap(kek, data)
    assert lib_unwrap(kek, wrapped) == data


@settings(max_examples=50, deadline=None)
@given(
    kek=st.binary(min_size=16, max_size=16),
    iv=st.binary(min_size=8, max_size=8),
    blocks=st.integers(min_value=2, max_value=12),
    seed=st.binary(min_size=96, max_size=96),
)
def test_wrap_with_custom_iv_matches_shifting_formulation(
    kek: bytes, iv: bytes, blocks: int, seed: bytes
) -> None:
    data = seed[: 8 * blocks]
    wrapped = aes_key_wrap(kek, iv, data)
    assert wrapped == reference_wrap(kek, iv, data)
    assert aes_key_unwrap(kek, iv, wrapped) == data


def test_custom_iv_changes_output_and_is_checked() -> None:
    iv = bytes.fromhex("0102030405060708")
    wrapped = aes_key_wrap(KEK, iv, KW_DATA)
    assert wrapped != KW_OUT
    with pytest.raises(CryptoError, match="integrity"):
        aes_key_unwrap(KEK, KW_DEFAULT_IV, wrapped)


@pytest.mark.parametrize("length", [0, 8, 15, 17, 23])
def test_kw_rejects_bad_plaintext_lengths(length: int) -> None:
    with pytest.raises(CryptoError, match="multiple of 8"):
        encrypt_kemac_data(EncrAlg.AES_KW_128, KEK, KW_DEFAULT_IV, 0, bytes(8), bytes(length))


@pytest.mark.parametrize("length", [0, 16, 23, 25])
def test_kw_rejects_bad_ciphertext_lengths(length: int) -> None:
    with pytest.raises(CryptoError, match="multiple of 8"):
        decrypt_kemac_data(EncrAlg.AES_KW_128, KEK, KW_DEFAULT_IV, 0, bytes(8), bytes(length))


def test_kw_tamper_and_wrong_key_fail() -> None:
    tampered = KW_OUT[:-1] + bytes([KW_OUT[-1] ^ 1])
    with pytest.raises(CryptoError, match="integrity") as info:
        decrypt_kemac_data(EncrAlg.AES_KW_128, KEK, KW_DEFAULT_IV, 0, bytes(8), tampered)
    assert KEK.hex() not in str(info.value).lower()
    with pytest.raises(CryptoError, match="integrity"):
        decrypt_kemac_data(EncrAlg.AES_KW_128, bytes(16), KW_DEFAULT_IV, 0, bytes(8), KW_OUT)


def test_kw_key_and_iv_lengths() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        encrypt_kemac_data(EncrAlg.AES_KW_128, bytes(32), bytes(8), 0, bytes(8), bytes(16))
    with pytest.raises(ValueError, match="8 bytes"):
        encrypt_kemac_data(EncrAlg.AES_KW_128, bytes(16), bytes(14), 0, bytes(8), bytes(16))
    with pytest.raises(ValueError, match="8 bytes"):
        aes_key_wrap(KEK, bytes(7), KW_DATA)
    with pytest.raises(ValueError, match="8 bytes"):
        aes_key_unwrap(KEK, bytes(9), KW_OUT)


# --- round trip for every encr alg ------------------------------------------------------------

KEY_LEN = {EncrAlg.NULL: 0, EncrAlg.AES_CM_128: 16, EncrAlg.AES_KW_128: 16, EncrAlg.AES_CM_256: 32}
SALT_LEN = {EncrAlg.NULL: 0, EncrAlg.AES_CM_128: 14, EncrAlg.AES_KW_128: 8, EncrAlg.AES_CM_256: 14}


@settings(max_examples=200, deadline=None)
@given(
    encr_alg=st.sampled_from(list(EncrAlg)),
    material=st.binary(min_size=46, max_size=46),
    csb_id=st.integers(min_value=0, max_value=0xFFFFFFFF),
    t64=st.binary(min_size=8, max_size=8),
    data=st.binary(max_size=300),
)
def test_round_trip_all_encr_algs(
    encr_alg: EncrAlg, material: bytes, csb_id: int, t64: bytes, data: bytes
) -> None:
    key = material[: KEY_LEN[encr_alg]]
    salt = material[32 : 32 + SALT_LEN[encr_alg]]
    if encr_alg == EncrAlg.AES_KW_128:
        data = (data + bytes(16))[: max(16, len(data) // 8 * 8)]
    ct = encrypt_kemac_data(encr_alg, key, salt, csb_id, t64, data)
    assert decrypt_kemac_data(encr_alg, key, salt, csb_id, t64, ct) == data
    expected_len = len(data) + (8 if encr_alg == EncrAlg.AES_KW_128 else 0)
    assert len(ct) == expected_len
    if encr_alg == EncrAlg.NULL:
        assert ct == data
    elif len(data) >= 16:
        assert ct != data


# --- MACs ------------------------------------------------------------------------------------

JEFE_DATA = b"what do ya want for nothing?"


def test_hmac_sha1_rfc2202_case_2() -> None:
    tag = compute_mac(MacAlg.HMAC_SHA_1_160, b"Jefe", JEFE_DATA)
    assert tag == bytes.fromhex("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79")
    assert verify_mac(MacAlg.HMAC_SHA_1_160, b"Jefe", JEFE_DATA, tag)


def test_hmac_sha256_rfc4231_case_2() -> None:
    tag = compute_mac(MacAlg.HMAC_SHA_256_256, b"Jefe", JEFE_DATA)
    assert tag == bytes.fromhex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    assert verify_mac(MacAlg.HMAC_SHA_256_256, b"Jefe", JEFE_DATA, tag)


def test_null_mac() -> None:
    assert compute_mac(MacAlg.NULL, b"", b"data") == b""
    assert verify_mac(MacAlg.NULL, b"", b"data", b"")
    assert not verify_mac(MacAlg.NULL, b"", b"data", b"\x00")


@pytest.mark.parametrize("mac_alg", [MacAlg.HMAC_SHA_1_160, MacAlg.HMAC_SHA_256_256])
def test_verify_mac_rejects(mac_alg: MacAlg) -> None:
    key = bytes(range(32))
    tag = compute_mac(mac_alg, key, b"msg")
    assert verify_mac(mac_alg, key, b"msg", tag)
    assert not verify_mac(mac_alg, key, b"msg", tag[:-1] + bytes([tag[-1] ^ 0x80]))
    assert not verify_mac(mac_alg, key, b"msh", tag)
    assert not verify_mac(mac_alg, key[:-1], b"msg", tag)
    assert not verify_mac(mac_alg, key, b"msg", tag[:-1])
    assert not verify_mac(mac_alg, key, b"msg", tag + b"\x00")


def test_compute_mac_needs_key() -> None:
    with pytest.raises(ValueError, match="auth_key"):
        compute_mac(MacAlg.HMAC_SHA_1_160, b"", b"x")
