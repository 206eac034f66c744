"""NTP timestamps for MIKEY T / TR payloads (RFC 3830 6.6, RFC 6043 6.3 / 6.6, RFC 4330 3).

All conversions are pure: the caller passes the time in. NTP seconds fields use the
RFC 4330 section 3 era rule adopted by RFC 6043 6.3 (reference section 10):

- MSB = 1: 1968-01-20 03:14:08 .. 2036-02-07 06:28:15 UTC, counted from 1900-01-01;
- MSB = 0: 2036-02-07 06:28:16 .. 2104-02-26 09:42:23 UTC, counted from 2036-02-07 06:28:16.

TS type NTP (1) is "NTP time in an unspecified time zone" in RFC 3830 6.6; this module treats
its value exactly like NTP-UTC and leaves any zone offset to the caller.
"""

from __future__ import annotations

import math

from kms.mikey.constants import TS_VALUE_LENGTH, TsType

NTP_UNIX_OFFSET = 2_208_988_800
"""Seconds from 1900-01-01 00:00:00 UTC (NTP epoch) to 1970-01-01 (Unix epoch)."""

ERA1_UNIX_OFFSET = (1 << 32) - NTP_UNIX_OFFSET  # 2085978496
"""Unix time of 2036-02-07 06:28:16 UTC, the origin of NTP era 1 (RFC 4330 3)."""

NTP32_MSB = 0x8000_0000
NTP32_MASK = 0xFFFF_FFFF
NTP_FRACTION_SCALE = 1 << 32

MIN_UNIX = NTP32_MSB - NTP_UNIX_OFFSET  # -61505152 = 1968-01-20 03:14:08 UTC
MAX_UNIX = MIN_UNIX + NTP32_MASK  # 4233462143 = 2104-02-26 09:42:23 UTC

_NTP_TYPES = frozenset({TsType.NTP_UTC, TsType.NTP, TsType.NTP_UTC_32})


def unix_to_ntp32(unix_seconds: int) -> int:
    """Unix seconds -> 32-bit NTP seconds (RFC 4330 3, RFC 6043 6.3).

    Raises ValueError outside the representable window [MIN_UNIX, MAX_UNIX].
    """
    if not MIN_UNIX <= unix_seconds <= MAX_UNIX:
        raise ValueError("time outside the NTP window 1968-01-20 .. 2104-02-26")
    return (unix_seconds + NTP_UNIX_OFFSET) & NTP32_MASK


def ntp32_to_unix(s: int) -> int:
    """32-bit NTP seconds -> Unix seconds with the RFC 4330 3 era rule (RFC 6043 6.3)."""
    if not 0 <= s <= NTP32_MASK:
        raise ValueError("NTP seconds must fit in 32 bits")
    if s & NTP32_MSB:  # era 0, counted from 1900
        return s - NTP_UNIX_OFFSET
    return s + ERA1_UNIX_OFFSET  # era 1, counted from 2036-02-07 06:28:16


def unix_to_ntp64(t: float | int) -> int:
    """Unix time -> 64-bit NTP timestamp (32-bit seconds with the era rule, 32-bit fraction).

    The fraction is rounded to the nearest 2^-32 s; a fraction that rounds up to a whole
    second carries into the seconds field. Raises ValueError outside the NTP window.
    """
    if isinstance(t, float) and not math.isfinite(t):
        raise ValueError("time must be finite")
    seconds = math.floor(t)
    fraction = round((t - seconds) * NTP_FRACTION_SCALE)
    if fraction >= NTP_FRACTION_SCALE:
        seconds += 1
        fraction -= NTP_FRACTION_SCALE
    return (unix_to_ntp32(seconds) << 32) | fraction


def ntp64_to_unix(v: int) -> float:
    """64-bit NTP timestamp -> Unix time (era rule on the seconds part, RFC 4330 3)."""
    if not 0 <= v < 1 << 64:
        raise ValueError("NTP timestamp must fit in 64 bits")
    return ntp32_to_unix(v >> 32) + (v & NTP32_MASK) / NTP_FRACTION_SCALE


def _check_ts_value(ts_type: TsType, ts_value: bytes) -> None:
    expected = TS_VALUE_LENGTH[TsType(ts_type)]
    if len(ts_value) != expected:
        raise ValueError(f"TS type {int(ts_type)} value must be {expected} bytes")


def timestamp_t64(ts_type: TsType, ts_value: bytes) -> bytes:
    """The 64-bit timestamp used in AES-CM IVs and PRF inputs (RFC 3830 4.2.3; RFC 6043 6.3).

    NTP-UTC / NTP: the 8 bytes as sent; NTP-UTC-32: seconds || 0x00000000 (zero fraction,
    RFC 6043 6.3); COUNTER: 0x00000000 || counter (docs/rfc-readings.md R2).
    """
    ts_type = TsType(ts_type)
    _check_ts_value(ts_type, ts_value)
    if ts_type in (TsType.NTP_UTC, TsType.NTP):
        return bytes(ts_value)
    if ts_type == TsType.NTP_UTC_32:
        return bytes(ts_value) + b"\x00" * 4
    return b"\x00" * 4 + bytes(ts_value)  # COUNTER


def encode_ts_value(ts_type: TsType, unix_time: float) -> bytes:
    """TS value bytes for an NTP TS type (RFC 3830 6.6, RFC 6043 6.6).

    NTP-UTC-32 truncates to whole seconds. COUNTER has no time and raises ValueError.
    """
    ts_type = TsType(ts_type)
    if ts_type not in _NTP_TYPES:
        raise ValueError("COUNTER timestamps do not carry a time")
    if ts_type == TsType.NTP_UTC_32:
        if isinstance(unix_time, float) and not math.isfinite(unix_time):
            raise ValueError("time must be finite")
        return unix_to_ntp32(math.floor(unix_time)).to_bytes(4, "big")
    return unix_to_ntp64(unix_time).to_bytes(8, "big")


def decode_ts_value(ts_type: TsType, value: bytes) -> float:
    """Unix time of an NTP TS value (era rule of RFC 4330 3). COUNTER raises ValueError."""
    ts_type = TsType(ts_type)
    if ts_type not in _NTP_TYPES:
        raise ValueError("COUNTER timestamps do not carry a time")
    _check_ts_value(ts_type, value)
    if ts_type == TsType.NTP_UTC_32:
        return float(ntp32_to_unix(int.from_bytes(value, "big")))
    return ntp64_to_unix(int.from_bytes(value, "big"))


__all__ = [
    "ERA1_UNIX_OFFSET",
    "MAX_UNIX",
    "MIN_UNIX",
    "NTP32_MASK",
    "NTP32_MSB",
    "NTP_FRACTION_SCALE",
    "NTP_UNIX_OFFSET",
    "decode_ts_value",
    "encode_ts_value",
    "ntp32_to_unix",
    "ntp64_to_unix",
    "timestamp_t64",
    "unix_to_ntp32",
    "unix_to_ntp64",
]
