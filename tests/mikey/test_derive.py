"""Tests for kms.mikey.derive (RFC 3830 4.1.3-4.1.4, RFC 6043 5.1; docs/rfc-readings.md V1)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

import kms.mikey.prf as prf_mod
from kms.mikey.constants import EncrAlg, MacAlg, PrfLabel
from kms.mikey.derive import (
    KeyDirection,
    MessageKeys,
    derive_exchange_keys,
    derive_forked_mpkr,
    derive_forked_tgk,
    derive_message_keys,
    derive_mpki,
    derive_mpki_mpkr,
    derive_mpkr,
    derive_rfc3830_message_keys,
    derive_rfc3830_srtp_salt,
    derive_rfc3830_tek,
    derive_session_key,
    derive_srtp_salt,
    derive_tek,
    derive_ticket_keys,
    derive_vr_auth_key,
    derive_vr_key_and_forked_mpkr,
    forking_label,
    message_key_label,
    mpk_label,
    rfc3830_message_key_label,
    rfc3830_tgk_label,
    session_key_label,
    ticket_key_label,
    vr_key_label,
)
from kms.mikey.prf import PrfFunc, prf, software_prf

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "reference_s11.json").read_text()
)
ROWS: dict[str, dict[str, Any]] = {r["case"]: r for r in VECTORS["prf_mikey_1"]}

K = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
TGK = bytes.fromhex("202122232425262728292a2b2c2d2e2f")
RAND = bytes.fromhex("101112131415161718191a1b1c1d1e1f")
RAND_HEX = "10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f"
CSB = 0xA1B2C3D4


def out(case: str) -> bytes:
    return bytes.fromhex(ROWS[case]["output"])


def h(text: str) -> bytes:
    return bytes.fromhex(text)


class RecordingPrf:
    """A KeyedPrf stand-in that records (label, length) and returns distinct bytes."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, int]] = []

    def __call__(self, label: bytes, out_len: int) -> bytes:
        assert out_len > 0, "the PRF must never be asked for 0 bytes"
        self.calls.append((label, out_len))
        return hashlib.shake_256(label).digest(out_len)


# --- label builders, byte for byte (RFC 3830 4.1.4 / RFC 6043 5.1) ---------------------------


def test_message_key_label_initial_matches_table() -> None:
    label = message_key_label(PrfLabel.ENCR, CSB, KeyDirection.INITIAL, RAND, None)
    assert label == h(f"150533e1 ff a1b2c3d4 01 10 {RAND_HEX} 00")
    assert label.hex() == ROWS["rfc6043_initial_encr"]["label"]


def test_message_key_label_response_both_rands() -> None:
    label = message_key_label(PrfLabel.AUTH, CSB, KeyDirection.RESPONSE, RAND, b"\xaa\xbb\xcc")
    assert label == h(f"2d22ac75 ff a1b2c3d4 02 10 {RAND_HEX} 03 aabbcc")


def test_message_key_label_only_rand_r() -> None:
    label = message_key_label(PrfLabel.SALT, 0x01020304, KeyDirection.INITIAL, None, b"\x55\x66")
    assert label == h("29b88916 ff 01020304 01 00 02 5566")


def test_message_key_label_absent_rands_are_zero_length() -> None:
    assert message_key_label(PrfLabel.ENCR, 0, KeyDirection.RESPONSE, None, None) == h(
        "150533e1 ff 00000000 02 00 00"
    )
    assert message_key_label(PrfLabel.ENCR, 0, KeyDirection.RESPONSE, b"", b"") == h(
        "150533e1 ff 00000000 02 00 00"
    )


def test_forking_labels() -> None:
    assert forking_label(PrfLabel.FORK_MPKR, b"alice", b"\x01\x02\x03\x04") == h(
        "2b288856 ff ffffffff 00 0005 616c696365 04 01020304"
    )
    assert forking_label(PrfLabel.FORK_TGK, b"", b"") == h("1512b54a ff ffffffff 00 0000 00")
    long_id = bytes(300)
    assert forking_label(PrfLabel.FORK_TGK, long_id, b"\x09")[:12] == h(
        "1512b54a ff ffffffff 00 012c"
    )


def test_session_key_labels() -> None:
    assert session_key_label(PrfLabel.TEK, 1, RAND, None) == h(
        f"2ad01c64 01 ffffffff 03 10 {RAND_HEX} 00"
    )
    assert session_key_label(PrfLabel.TEK, 1, RAND, None).hex() == ROWS["rfc6043_tek"]["label"]
    assert session_key_label(PrfLabel.SALT_FROM_TGK, 7, None, b"\xab\xcd") == h(
        "39a2c14b 07 ffffffff 03 00 02 abcd"
    )
    assert session_key_label(PrfLabel.TEK, 255, b"\x01", b"\x02\x03") == h(
        "2ad01c64 ff ffffffff 03 01 01 02 0203"
    )


def test_vr_ticket_and_mpk_labels() -> None:
    assert vr_key_label(PrfLabel.AUTH) == h("2d22ac75 ff ffffffff 04")
    assert ticket_key_label(PrfLabel.ENCR, RAND) == h(f"150533e1 ff ffffffff 05 10 {RAND_HEX}")
    assert ticket_key_label(PrfLabel.SALT, b"") == h("29b88916 ff ffffffff 05 00")
    assert mpk_label(PrfLabel.MPKI, RAND) == h(f"220e99a2 ff ffffffff 06 10 {RAND_HEX}")
    assert mpk_label(PrfLabel.MPKR, b"\x42") == h("1f4d675b ff ffffffff 06 01 42")


def test_rfc3830_labels() -> None:
    assert rfc3830_message_key_label(PrfLabel.SALT, CSB, RAND) == h(
        f"29b88916 ff a1b2c3d4 {RAND_HEX}"
    )
    assert (
        rfc3830_message_key_label(PrfLabel.ENCR, CSB, RAND).hex() == (ROWS["rfc3830_encr"]["label"])
    )
    assert rfc3830_tgk_label(PrfLabel.TEK, 1, CSB, RAND) == h(f"2ad01c64 01 a1b2c3d4 {RAND_HEX}")
    assert rfc3830_tgk_label(PrfLabel.TEK, 1, CSB, RAND).hex() == ROWS["rfc3830_tek"]["label"]


def test_label_constants_accept_plain_ints() -> None:
    assert vr_key_label(0x01020304) == h("01020304 ff ffffffff 04")


@pytest.mark.parametrize(
    "call",
    [
        lambda: message_key_label(PrfLabel.ENCR, CSB, KeyDirection.INITIAL, bytes(256), None),
        lambda: message_key_label(PrfLabel.ENCR, 1 << 32, KeyDirection.INITIAL, None, None),
        lambda: message_key_label(PrfLabel.ENCR, -1, KeyDirection.INITIAL, None, None),
        lambda: message_key_label(1 << 32, 0, KeyDirection.INITIAL, None, None),
        lambda: message_key_label(PrfLabel.ENCR, 0, 3, None, None),  # type: ignore[arg-type]
        lambda: forking_label(PrfLabel.FORK_TGK, bytes(65536), b""),
        lambda: forking_label(PrfLabel.FORK_TGK, b"", bytes(256)),
        lambda: session_key_label(PrfLabel.TEK, 256, RAND, None),
        lambda: session_key_label(PrfLabel.TEK, -1, RAND, None),
        lambda: ticket_key_label(PrfLabel.ENCR, bytes(256)),
        lambda: mpk_label(PrfLabel.MPKI, bytes(256)),
        lambda: rfc3830_tgk_label(PrfLabel.TEK, 256, CSB, RAND),
        lambda: rfc3830_message_key_label(PrfLabel.ENCR, 1 << 32, RAND),
    ],
)
def test_label_field_overflow_raises(call: Any) -> None:
    with pytest.raises(ValueError, match=r"bits|bytes|KeyDirection"):
        call()


# --- derivations against section 11 ---------------------------------------------------------


def test_rfc3830_message_keys_vector() -> None:
    keys = derive_rfc3830_message_keys(
        software_prf(K, PrfFunc.MIKEY_1), CSB, RAND, EncrAlg.AES_CM_128, MacAlg.HMAC_SHA_1_160
    )
    assert keys.encr_key == out("rfc3830_encr")
    assert keys.auth_key == out("rfc3830_auth")
    assert keys.salt_key == out("rfc3830_salt")


@pytest.mark.parametrize(
    ("direction", "prefix"),
    [(KeyDirection.INITIAL, "rfc6043_initial"), (KeyDirection.RESPONSE, "rfc6043_response")],
)
def test_rfc6043_message_keys_vectors(direction: KeyDirection, prefix: str) -> None:
    keys = derive_message_keys(
        software_prf(K, PrfFunc.MIKEY_1),
        CSB,
        direction,
        RAND,
        None,
        EncrAlg.AES_CM_128,
        MacAlg.HMAC_SHA_1_160,
    )
    assert keys.encr_key == out(f"{prefix}_encr")
    assert keys.auth_key == out(f"{prefix}_auth")
    assert keys.salt_key == out(f"{prefix}_salt")


def test_rfc6043_tek_and_salt_vectors() -> None:
    prf_tgk = software_prf(TGK, PrfFunc.MIKEY_1)
    assert derive_tek(prf_tgk, 1, RAND, None, 16) == out("rfc6043_tek")
    assert derive_srtp_salt(prf_tgk, 1, RAND, None) == out("rfc6043_salt_from_tgk")


def test_rfc3830_tek_vector() -> None:
    prf_tgk = software_prf(TGK, PrfFunc.MIKEY_1)
    assert derive_rfc3830_tek(prf_tgk, 1, CSB, RAND, 16) == out("rfc3830_tek")


def test_rfc3830_srtp_salt_uses_salt_constant() -> None:
    prf_tgk = software_prf(TGK, PrfFunc.MIKEY_1)
    expected = prf(TGK, h(f"39a2c14b 01 a1b2c3d4 {RAND_HEX}"), 14)
    assert derive_rfc3830_srtp_salt(prf_tgk, 1, CSB, RAND) == expected
    assert derive_rfc3830_srtp_salt(prf_tgk, 1, CSB, RAND, 12) == expected[:12]


def test_prf_hmac_sha256_message_key_vector() -> None:
    (row,) = VECTORS["prf_hmac_sha_256"]
    keys = derive_message_keys(
        software_prf(bytes.fromhex(row["key"]), PrfFunc.PRF_HMAC_SHA_256),
        CSB,
        KeyDirection.INITIAL,
        bytes(range(0x10, 0x30)),
        None,
        EncrAlg.AES_CM_256,
        MacAlg.HMAC_SHA_256_256,
    )
    assert keys.encr_key == bytes.fromhex(row["output"])
    assert len(keys.auth_key) == 32
    assert len(keys.salt_key) == 14


# --- lengths and labels used by each derivation ----------------------------------------------

ENCR_LEN = {EncrAlg.NULL: 0, EncrAlg.AES_CM_128: 16, EncrAlg.AES_KW_128: 16, EncrAlg.AES_CM_256: 32}
SALT_LEN = {EncrAlg.NULL: 0, EncrAlg.AES_CM_128: 14, EncrAlg.AES_KW_128: 8, EncrAlg.AES_CM_256: 14}
AUTH_LEN = {MacAlg.NULL: 0, MacAlg.HMAC_SHA_1_160: 20, MacAlg.HMAC_SHA_256_256: 32}


@pytest.mark.parametrize("encr_alg", list(EncrAlg))
@pytest.mark.parametrize("mac_alg", list(MacAlg))
def test_message_key_lengths(encr_alg: EncrAlg, mac_alg: MacAlg) -> None:
    rec = RecordingPrf()
    keys = derive_message_keys(rec, CSB, KeyDirection.INITIAL, RAND, None, encr_alg, mac_alg)
    assert len(keys.encr_key) == ENCR_LEN[encr_alg]
    assert len(keys.salt_key) == SALT_LEN[encr_alg]
    assert len(keys.auth_key) == AUTH_LEN[mac_alg]
    # NULL algorithms derive nothing: exactly one PRF call per non-empty key.
    expected_calls = sum(
        1 for n in (ENCR_LEN[encr_alg], SALT_LEN[encr_alg], AUTH_LEN[mac_alg]) if n
    )
    assert len(rec.calls) == expected_calls
    rfc3830 = derive_rfc3830_message_keys(RecordingPrf(), CSB, RAND, encr_alg, mac_alg)
    assert len(rfc3830.encr_key) == ENCR_LEN[encr_alg]
    assert len(rfc3830.salt_key) == SALT_LEN[encr_alg]
    assert len(rfc3830.auth_key) == AUTH_LEN[mac_alg]


def test_ticket_keys_use_type_05_labels() -> None:
    rec = RecordingPrf()
    keys = derive_ticket_keys(rec, RAND, EncrAlg.AES_CM_128, MacAlg.HMAC_SHA_1_160)
    assert sorted(rec.calls) == sorted(
        [
            (h(f"150533e1 ff ffffffff 05 10 {RAND_HEX}"), 16),
            (h(f"2d22ac75 ff ffffffff 05 10 {RAND_HEX}"), 20),
            (h(f"29b88916 ff ffffffff 05 10 {RAND_HEX}"), 14),
        ]
    )
    assert keys.encr_key == hashlib.shake_256(h(f"150533e1 ff ffffffff 05 10 {RAND_HEX}")).digest(
        16
    )


def test_ticket_keys_with_real_prf_differ_from_message_keys() -> None:
    p = software_prf(K, PrfFunc.MIKEY_1)
    tk = derive_ticket_keys(p, RAND, EncrAlg.AES_CM_128, MacAlg.HMAC_SHA_1_160)
    assert tk.encr_key == prf(K, h(f"150533e1 ff ffffffff 05 10 {RAND_HEX}"), 16)
    assert tk.encr_key != out("rfc6043_initial_encr")


def test_mpk_derivations() -> None:
    rec = RecordingPrf()
    mpki = derive_mpki(rec, RAND, 16)
    mpkr = derive_mpkr(rec, RAND, 32)
    assert rec.calls == [
        (h(f"220e99a2 ff ffffffff 06 10 {RAND_HEX}"), 16),
        (h(f"1f4d675b ff ffffffff 06 10 {RAND_HEX}"), 32),
    ]
    assert len(mpki) == 16
    assert len(mpkr) == 32


def test_batched_derivations_equal_the_single_ones() -> None:
    # The KMS derives MPKi/MPKr and (Vr key, MPKr') in one key-store call each; the labels
    # and outputs must be exactly those of the one-at-a-time derivations above.
    rec = RecordingPrf()
    pair = derive_mpki_mpkr(rec, RAND, 16)
    assert pair == (derive_mpki(rec, RAND, 16), derive_mpkr(rec, RAND, 16))
    assert rec.calls[:2] == rec.calls[2:]
    p = software_prf(K, PrfFunc.MIKEY_1)
    assert derive_vr_key_and_forked_mpkr(p, MacAlg.HMAC_SHA_1_160, b"bob", b"\x01\x02", 16) == (
        derive_vr_auth_key(p, MacAlg.HMAC_SHA_1_160),
        derive_forked_mpkr(p, b"bob", b"\x01\x02", 16),
    )


def test_forked_derivations() -> None:
    rec = RecordingPrf()
    derive_forked_mpkr(rec, b"bob", b"\x01\x02", 16)
    derive_forked_tgk(rec, b"bob", b"\x01\x02", 20)
    assert rec.calls == [
        (h("2b288856 ff ffffffff 00 0003 626f62 02 0102"), 16),
        (h("1512b54a ff ffffffff 00 0003 626f62 02 0102"), 20),
    ]


def test_forked_key_real_prf() -> None:
    expected = prf(TGK, h("1512b54a ff ffffffff 00 0003 626f62 02 0102"), 16)
    assert derive_forked_tgk(software_prf(TGK, PrfFunc.MIKEY_1), b"bob", b"\x01\x02", 16) == (
        expected
    )


@pytest.mark.parametrize(
    ("rand_i", "rand_r", "tail"),
    [
        (RAND, None, f"10 {RAND_HEX} 00"),  # H = 1, G = 0
        (None, b"\x77\x88", "00 02 7788"),  # H = 0, G = 1
        (RAND, b"\x77\x88", f"10 {RAND_HEX} 02 7788"),  # H = 1, G = 1
    ],
)
def test_session_key_flags(rand_i: bytes | None, rand_r: bytes | None, tail: str) -> None:
    rec = RecordingPrf()
    derive_tek(rec, 2, rand_i, rand_r, 16)
    derive_srtp_salt(rec, 2, rand_i, rand_r)
    assert rec.calls == [
        (h(f"2ad01c64 02 ffffffff 03 {tail}"), 16),
        (h(f"39a2c14b 02 ffffffff 03 {tail}"), 14),
    ]


def test_session_key_needs_a_rand() -> None:
    rec = RecordingPrf()
    with pytest.raises(ValueError, match="RANDRi or RANDRr"):
        derive_tek(rec, 1, None, None, 16)
    with pytest.raises(ValueError, match="RANDRi or RANDRr"):
        derive_srtp_salt(rec, 1, None, None)
    with pytest.raises(ValueError, match="RANDRi or RANDRr"):
        derive_session_key(rec, PrfLabel.AUTH_FROM_TGK, 1, None, None, 20)
    assert rec.calls == []


def test_generic_session_key_constant() -> None:
    rec = RecordingPrf()
    derive_session_key(rec, PrfLabel.AUTH_FROM_TGK, 3, RAND, None, 20)
    assert rec.calls == [(h(f"1b5c7973 03 ffffffff 03 10 {RAND_HEX} 00"), 20)]


@pytest.mark.parametrize(
    ("mac_alg", "length"),
    [(MacAlg.HMAC_SHA_1_160, 20), (MacAlg.HMAC_SHA_256_256, 32), (MacAlg.NULL, 0)],
)
def test_vr_auth_key(mac_alg: MacAlg, length: int) -> None:
    rec = RecordingPrf()
    key = derive_vr_auth_key(rec, mac_alg)
    assert len(key) == length
    assert rec.calls == ([(h("2d22ac75 ff ffffffff 04"), length)] if length else [])


def test_rfc3830_tek_label_used() -> None:
    rec = RecordingPrf()
    derive_rfc3830_tek(rec, 1, CSB, RAND, 16)
    assert rec.calls == [(h(f"2ad01c64 01 a1b2c3d4 {RAND_HEX}"), 16)]


# --- MessageKeys / KeyDirection --------------------------------------------------------------


def test_message_keys_repr_hides_values() -> None:
    keys = MessageKeys(encr_key=out("rfc3830_encr"), auth_key=b"\xab" * 20, salt_key=b"\xcd" * 14)
    text = repr(keys) + str(keys)
    assert out("rfc3830_encr").hex() not in text
    assert "abab" not in text
    assert "cdcd" not in text
    assert "16 bytes" in text
    assert all(not f.repr for f in dataclasses.fields(MessageKeys))


def test_message_keys_frozen() -> None:
    keys = MessageKeys(b"a", b"b", b"c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        keys.encr_key = b"x"  # type: ignore[misc]
    assert keys == MessageKeys(b"a", b"b", b"c")


def test_key_direction_values() -> None:
    assert int(KeyDirection.INITIAL) == 0x01
    assert int(KeyDirection.RESPONSE) == 0x02
    assert bytes([KeyDirection.RESPONSE]) == b"\x02"


@pytest.mark.parametrize("rands", [(b"\x01" * 16, None), (None, b"\x02" * 20)])
@pytest.mark.parametrize(
    "initial",
    [(EncrAlg.NULL, MacAlg.HMAC_SHA_1_160), (EncrAlg.AES_CM_128, MacAlg.HMAC_SHA_1_160)],
)
def test_exchange_keys_are_both_directions_in_one_operation(
    rands: tuple[bytes | None, bytes | None], initial: tuple[EncrAlg, MacAlg]
) -> None:
    key = bytes(range(16))
    calls: list[int] = []

    def fn(label: bytes, n: int) -> bytes:
        return prf_mod.prf(key, label, n)

    def many(requests: list[tuple[bytes, int]]) -> list[bytes]:
        calls.append(len(requests))
        return [fn(label, n) for label, n in requests]

    fn.many = many  # type: ignore[attr-defined]
    response = (EncrAlg.AES_CM_128, MacAlg.HMAC_SHA_1_160)
    first, second = derive_exchange_keys(fn, 0x1234, *rands, initial, response)
    alone = prf_mod.software_prf(key, prf_mod.PrfFunc.MIKEY_1)
    assert first == derive_message_keys(alone, 0x1234, KeyDirection.INITIAL, *rands, *initial)
    assert second == derive_message_keys(alone, 0x1234, KeyDirection.RESPONSE, *rands, *response)
    assert calls == [(3 if initial[0] else 1) + 3]
    assert first.auth_key != second.auth_key
