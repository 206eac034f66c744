"""Tests for kms.mikey.prf: the docs/rfc-readings.md V1 vectors and an independent PRF
(RFC 3830 4.1.2)."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.mikey.prf import (
    PrfFunc,
    block_bytes,
    prf,
    prf_over,
    software_hmac,
    software_prf,
    split_in_key,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "reference_s11.json").read_text()
)
PRF_ROWS: list[dict[str, Any]] = VECTORS["prf_mikey_1"] + VECTORS["prf_hmac_sha_256"]


def _digest(func: PrfFunc) -> Any:
    return hashlib.sha1 if func == PrfFunc.MIKEY_1 else hashlib.sha256


def reference_p(s: bytes, label: bytes, m: int, func: PrfFunc) -> bytes:
    """P(s, label, m) of RFC 3830 4.1.2, written independently of kms.mikey.prf."""
    a = label
    p = b""
    for _ in range(m):
        a = hmac.new(s, a, _digest(func)).digest()
        p += hmac.new(s, a + label, _digest(func)).digest()
    return p


def reference_prf(key: bytes, label: bytes, out_len: int, func: PrfFunc) -> bytes:
    """Straightforward RFC 3830 4.1.2 PRF, written independently of kms.mikey.prf."""
    h = _digest(func)().digest_size
    m = (out_len + h - 1) // h
    n = (len(key) + 31) // 32
    result = bytes(m * h)
    for i in range(n):
        p = reference_p(key[32 * i : 32 * (i + 1)], label, m, func)
        result = bytes(x ^ y for x, y in zip(result, p, strict=True))
    return result[:out_len]


def test_vector_file_has_provenance_and_all_rows() -> None:
    assert VECTORS["source"].startswith("computed independently of kms.mikey")
    assert len(VECTORS["prf_mikey_1"]) == 12
    assert len(VECTORS["prf_hmac_sha_256"]) == 1


@pytest.mark.parametrize("row", PRF_ROWS, ids=[r["case"] for r in PRF_ROWS])
def test_section11_prf_vectors(row: dict[str, Any]) -> None:
    key = bytes.fromhex(row["key"])
    label = bytes.fromhex(row["label"])
    expected = bytes.fromhex(row["output"])
    func = PrfFunc(row["prf_func"])
    assert prf(key, label, len(expected), func) == expected
    assert software_prf(key, func)(label, len(expected)) == expected
    assert reference_prf(key, label, len(expected), func) == expected


def test_prf_hmac_sha256_vector_is_256_bits() -> None:
    (row,) = VECTORS["prf_hmac_sha_256"]
    key = bytes.fromhex(row["key"])
    label = bytes.fromhex(row["label"])
    out = prf(key, label, 32, PrfFunc.PRF_HMAC_SHA_256)
    assert out.hex() == "eae6382c17224e0d44debabc712b70bc5be330a9535da884c6b60fde5af5116c"
    # The same inputs under MIKEY-1 must give something else.
    assert prf(key, label, 32, PrfFunc.MIKEY_1) != out


def test_default_func_is_mikey_1() -> None:
    row = VECTORS["prf_mikey_1"][0]
    expected = bytes.fromhex(row["output"])
    assert prf(bytes.fromhex(row["key"]), bytes.fromhex(row["label"]), len(expected)) == expected


@pytest.mark.parametrize("func", list(PrfFunc))
@pytest.mark.parametrize("key_len", [33, 64, 65, 80, 100])
@pytest.mark.parametrize("out_len", [1, 19, 20, 21, 31, 33, 63, 100])
def test_long_keys_split_in_256_bit_slices(func: PrfFunc, key_len: int, out_len: int) -> None:
    key = bytes((7 * i + 3) % 256 for i in range(key_len))
    label = bytes.fromhex("150533e1ffa1b2c3d40110") + bytes(range(16)) + b"\x00"
    out = prf(key, label, out_len, func)
    assert len(out) == out_len
    assert out == reference_prf(key, label, out_len, func)
    # More than one slice: must differ from using only the first 256 bits.
    assert out != prf(key[:32], label, out_len, func)


@pytest.mark.parametrize("func", list(PrfFunc))
def test_256_bit_key_is_one_slice_not_empty_key(func: PrfFunc) -> None:
    # docs/rfc-readings.md V2: minisip's len % 32 bug would HMAC with an empty key here.
    key = bytes(range(32))
    label = b"label"
    out = prf(key, label, 40, func)
    assert out == reference_prf(key, label, 40, func)
    assert out != reference_p(b"", label, 2, func)[:40]


@pytest.mark.parametrize("func", list(PrfFunc))
def test_outputs_not_multiple_of_block_are_prefixes(func: PrfFunc) -> None:
    key = bytes(range(16))
    label = b"\x2a\xd0\x1c\x64\x01"
    full = prf(key, label, 3 * block_bytes(func), func)
    for n in (1, 7, block_bytes(func) - 1, block_bytes(func) + 1, 2 * block_bytes(func) + 5):
        assert prf(key, label, n, func) == full[:n]
        assert prf(key, label, n, func) == reference_prf(key, label, n, func)


def test_block_bytes() -> None:
    assert block_bytes(PrfFunc.MIKEY_1) == 20
    assert block_bytes(PrfFunc.PRF_HMAC_SHA_256) == 32


def test_split_in_key() -> None:
    key = bytes(range(70))
    assert split_in_key(key) == [key[:32], key[32:64], key[64:]]
    assert split_in_key(bytes(32)) == [bytes(32)]
    with pytest.raises(ValueError, match="empty"):
        split_in_key(b"")


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="empty"):
        prf(b"", b"label", 16)
    with pytest.raises(ValueError, match="positive"):
        prf(b"k", b"label", 0)
    with pytest.raises(ValueError, match="at least one"):
        prf_over([], b"label", 16, PrfFunc.MIKEY_1)


def test_prf_over_matches_prf_with_explicit_slices() -> None:
    key = bytes(range(50))
    hmacs = [software_hmac(s, PrfFunc.PRF_HMAC_SHA_256) for s in split_in_key(key)]
    label = b"abc"
    expected = prf(key, label, 45, PrfFunc.PRF_HMAC_SHA_256)
    assert prf_over(hmacs, label, 45, PrfFunc.PRF_HMAC_SHA_256) == expected


@settings(max_examples=150, deadline=None)
@given(
    key=st.binary(min_size=1, max_size=100),
    label=st.binary(max_size=60),
    out_len=st.integers(min_value=1, max_value=90),
    func=st.sampled_from(list(PrfFunc)),
)
def test_prf_matches_reference_implementation(
    key: bytes, label: bytes, out_len: int, func: PrfFunc
) -> None:
    assert prf(key, label, out_len, func) == reference_prf(key, label, out_len, func)


def test_prf_func_maps_to_its_hmac_digest() -> None:
    # RFC 3830 4.1.2: MIKEY-1 is built on HMAC-SHA-1; RFC 6043 6.1: PRF-HMAC-SHA-256.
    from kms.keystore import Digest
    from kms.mikey.prf import hmac_digest

    assert hmac_digest(PrfFunc.MIKEY_1) is Digest.SHA1
    assert hmac_digest(PrfFunc.PRF_HMAC_SHA_256) is Digest.SHA256
    assert hmac_digest(Digest.SHA256) is Digest.SHA256
    key = bytes(range(40))
    for func in PrfFunc:
        assert prf(key, b"label", 40, func) == prf(key, b"label", 40, hmac_digest(func))


@pytest.mark.parametrize("func", list(PrfFunc))
@pytest.mark.parametrize("out_len", [1, 14, 16, 20])
def test_one_slice_one_block_shortcut_is_rfc3830_p(func: PrfFunc, out_len: int) -> None:
    """prf_over's shortcut for one in-key slice and one output block: HMAC(s, A_1 || label)
    with A_1 = HMAC(s, label) (RFC 3830 4.1.2), computed here by hand."""
    from kms.mikey.prf import prf_over, software_hmac

    key, label = bytes(range(7, 39)), b"label bytes"
    name = "sha1" if func == PrfFunc.MIKEY_1 else "sha256"
    a1 = hmac.new(key, label, name).digest()
    expected = hmac.new(key, a1 + label, name).digest()[:out_len]
    assert prf_over([software_hmac(key, func)], label, out_len, func) == expected
