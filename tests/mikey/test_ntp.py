"""Tests for kms.mikey.ntp (RFC 4330 3 era rule, RFC 6043 6.3, 6.10;
docs/rfc-readings.md R2, V1)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kms.mikey.constants import TsType
from kms.mikey.ntp import (
    MAX_UNIX,
    MIN_UNIX,
    NTP_UNIX_OFFSET,
    decode_ts_value,
    encode_ts_value,
    ntp32_to_unix,
    ntp64_to_unix,
    timestamp_t64,
    unix_to_ntp32,
    unix_to_ntp64,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "reference_s11.json").read_text()
)
NTP_ROWS: list[dict[str, str]] = VECTORS["ntp_utc_32_decode"]


def utc(text: str) -> int:
    return int(datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())


def test_window_constants() -> None:
    assert MIN_UNIX == -61505152
    assert MAX_UNIX == 4233462143
    assert NTP_UNIX_OFFSET == 2208988800
    assert utc("1968-01-20T03:14:08Z") == MIN_UNIX
    assert utc("2104-02-26T09:42:23Z") == MAX_UNIX


@pytest.mark.parametrize("row", NTP_ROWS, ids=[r["value"] for r in NTP_ROWS])
def test_section11_ntp_utc_32_decode(row: dict[str, str]) -> None:
    value = bytes.fromhex(row["value"])
    expected = utc(row["utc"])
    assert ntp32_to_unix(int(row["value"], 16)) == expected
    assert decode_ts_value(TsType.NTP_UTC_32, value) == float(expected)
    # and back
    assert unix_to_ntp32(expected) == int(row["value"], 16)
    assert encode_ts_value(TsType.NTP_UTC_32, float(expected)) == value


def test_era_boundaries() -> None:
    assert unix_to_ntp32(MIN_UNIX) == 0x80000000
    assert unix_to_ntp32(MAX_UNIX) == 0x7FFFFFFF
    assert unix_to_ntp32(0) == NTP_UNIX_OFFSET  # 1970-01-01 in era 0
    assert unix_to_ntp32(utc("2036-02-07T06:28:15Z")) == 0xFFFFFFFF
    assert unix_to_ntp32(utc("2036-02-07T06:28:16Z")) == 0
    with pytest.raises(ValueError, match="window"):
        unix_to_ntp32(MIN_UNIX - 1)
    with pytest.raises(ValueError, match="window"):
        unix_to_ntp32(MAX_UNIX + 1)


@pytest.mark.parametrize("bad", [-1, 1 << 32])
def test_ntp32_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="32 bits"):
        ntp32_to_unix(bad)


@given(st.integers(min_value=MIN_UNIX, max_value=MAX_UNIX))
def test_ntp32_round_trip_from_unix(unix: int) -> None:
    s = unix_to_ntp32(unix)
    assert 0 <= s <= 0xFFFFFFFF
    assert ntp32_to_unix(s) == unix


@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_ntp32_round_trip_from_ntp(s: int) -> None:
    unix = ntp32_to_unix(s)
    assert MIN_UNIX <= unix <= MAX_UNIX
    assert unix_to_ntp32(unix) == s


def test_ntp64_known_values() -> None:
    assert unix_to_ntp64(0) == NTP_UNIX_OFFSET << 32
    assert unix_to_ntp64(1.5) == ((NTP_UNIX_OFFSET + 1) << 32) | 0x80000000
    era1 = utc("2036-02-07T06:28:16Z")
    assert unix_to_ntp64(era1 + 0.25) == 0x40000000
    assert ntp64_to_unix(0x40000000) == era1 + 0.25
    assert ntp64_to_unix(0xEA1C2B3C_80000000) == utc("2024-06-18T15:50:20Z") + 0.5


def test_ntp64_fraction_carry() -> None:
    # A fraction that rounds to a whole second carries into the seconds field.
    assert unix_to_ntp64(1 - 2.0**-40) == (NTP_UNIX_OFFSET + 1) << 32


def test_ntp64_errors() -> None:
    with pytest.raises(ValueError, match="window"):
        unix_to_ntp64(MAX_UNIX + 1)
    with pytest.raises(ValueError, match="window"):
        unix_to_ntp64(MIN_UNIX - 0.5)
    with pytest.raises(ValueError, match="finite"):
        unix_to_ntp64(float("nan"))
    with pytest.raises(ValueError, match="64 bits"):
        ntp64_to_unix(1 << 64)


@given(st.floats(min_value=MIN_UNIX, max_value=MAX_UNIX - 1))
def test_ntp64_round_trip(t: float) -> None:
    v = unix_to_ntp64(t)
    assert 0 <= v < 1 << 64
    # float spacing near 4e9 is ~5e-7 s, the NTP fraction step is 2.3e-10 s.
    assert abs(ntp64_to_unix(v) - t) <= 1e-6


def test_timestamp_t64() -> None:
    v8 = bytes.fromhex("ea1c2b3c80000000")
    assert timestamp_t64(TsType.NTP_UTC, v8) == v8
    assert timestamp_t64(TsType.NTP, v8) == v8
    assert timestamp_t64(TsType.NTP_UTC_32, bytes.fromhex("ea1c2b3c")) == bytes.fromhex(
        "ea1c2b3c00000000"
    )
    assert timestamp_t64(TsType.COUNTER, bytes.fromhex("00000007")) == bytes.fromhex(
        "0000000000000007"
    )


@pytest.mark.parametrize(
    ("ts_type", "length"),
    [(TsType.NTP_UTC, 4), (TsType.NTP, 9), (TsType.NTP_UTC_32, 8), (TsType.COUNTER, 8)],
)
def test_timestamp_t64_wrong_length(ts_type: TsType, length: int) -> None:
    with pytest.raises(ValueError, match="bytes"):
        timestamp_t64(ts_type, bytes(length))


@pytest.mark.parametrize("ts_type", [TsType.NTP_UTC, TsType.NTP])
def test_encode_decode_64_bit_types(ts_type: TsType) -> None:
    t = utc("2024-06-18T15:50:20Z") + 0.5
    value = encode_ts_value(ts_type, t)
    assert value == bytes.fromhex("ea1c2b3c80000000")
    assert decode_ts_value(ts_type, value) == t


def test_ntp_utc_32_truncates_fraction() -> None:
    t = utc("2024-06-18T15:50:20Z") + 0.9
    assert encode_ts_value(TsType.NTP_UTC_32, t) == bytes.fromhex("ea1c2b3c")
    with pytest.raises(ValueError, match="finite"):
        encode_ts_value(TsType.NTP_UTC_32, float("inf"))


def test_counter_has_no_time() -> None:
    with pytest.raises(ValueError, match="COUNTER"):
        encode_ts_value(TsType.COUNTER, 0.0)
    with pytest.raises(ValueError, match="COUNTER"):
        decode_ts_value(TsType.COUNTER, bytes(4))


def test_decode_wrong_length() -> None:
    with pytest.raises(ValueError, match="bytes"):
        decode_ts_value(TsType.NTP_UTC_32, bytes(8))
