"""The MIKEY PRF (RFC 3830 4.1.2) and PRF-HMAC-SHA-256 (RFC 6043 6.1).

Written once over an "HMAC with key K" callable so that the same code runs with a key held
in host memory (endpoints, tests) and with a key held in a PKCS#11 token (the KMS).
"""

from __future__ import annotations

import hmac as _hmac
from collections.abc import Callable, Sequence
from enum import IntEnum

from kms.keystore import Digest

HmacFn = Callable[[bytes], bytes]
"""data -> HMAC tag; the key is held by whoever built the function."""

KeyedPrf = Callable[[bytes, int], bytes]
"""(label, out_len_bytes) -> PRF output; the in-key is held by whoever built the function.
A KeyedPrf may also have a ``many`` attribute, [(label, out_len), ...] -> outputs, that
computes several outputs in one go (one token operation); see :func:`prf_outputs`."""


def prf_outputs(prf: KeyedPrf, requests: Sequence[tuple[bytes, int]]) -> list[bytes]:
    """Several outputs under the same in-key: through ``prf.many`` when the PRF has it (one
    key-store call instead of one per output), else one call each."""
    many: Callable[[Sequence[tuple[bytes, int]]], list[bytes]] | None = getattr(
        prf, "many", None
    )
    if many is not None:
        return many(requests)
    return [prf(label, n) for label, n in requests]


class PrfFunc(IntEnum):
    """HDR / TP "PRF func" values (RFC 3830 6.1, RFC 6043 Table 6.3)."""

    MIKEY_1 = 0  # HMAC-SHA-1 based PRF of RFC 3830
    PRF_HMAC_SHA_256 = 1  # RFC 6043 6.1


PrfHash = PrfFunc | Digest
"""Which PRF to compute: a MIKEY PRF func, or directly the digest of the HMAC it is built on
(the key store's parameter: the construction of RFC 3830 4.1.2 is the same for both)."""


def hmac_digest(func: PrfHash) -> Digest:
    """The HMAC hash behind a PRF func: SHA-1 for MIKEY-1 (RFC 3830 4.1.2), SHA-256 for
    PRF-HMAC-SHA-256 (RFC 6043 6.1). This is the one place that maps the one to the other."""
    if isinstance(func, Digest):
        return func
    return Digest.SHA1 if func == PrfFunc.MIKEY_1 else Digest.SHA256


def digest_name(func: PrfHash) -> str:
    """hashlib name of the HMAC hash behind a PRF func."""
    return hmac_digest(func).value


def block_bytes(func: PrfHash) -> int:
    """Output block size of the PRF's HMAC (H/8 in RFC 3830 4.1.2)."""
    return 20 if hmac_digest(func) is Digest.SHA1 else 32


IN_KEY_SLICE = 32  # RFC 3830 4.1.2: the in-key is split in 256-bit slices (also for SHA-256)


def p_function(hmac: HmacFn, label: bytes, blocks: int) -> bytes:
    """P(s, label, m) of RFC 3830 4.1.2 with s held by ``hmac``."""
    a = label
    out = bytearray()
    for _ in range(blocks):
        a = hmac(a)  # A_i = HMAC(s, A_{i-1}), A_0 = label
        out += hmac(a + label)  # HMAC(s, A_i || label)
    return bytes(out)


def prf_over(hmacs: Sequence[HmacFn], label: bytes, out_len: int, func: PrfHash) -> bytes:
    """PRF(inkey, label) where inkey = s_1 || ... || s_n and ``hmacs[i]`` is HMAC keyed by s_i.

    Output is the first ``out_len`` bytes of P(s_1, label, m) XOR ... XOR P(s_n, label, m).
    """
    if not hmacs:
        raise ValueError("PRF needs at least one in-key slice")
    if out_len <= 0:
        raise ValueError("PRF output length must be positive")
    h = block_bytes(func)
    if out_len <= h and len(hmacs) == 1:
        # The common case (one slice, one block): P = HMAC(s, HMAC(s, label) || label).
        fn = hmacs[0]
        return fn(fn(label) + label)[:out_len]
    m = -(-out_len // h)
    acc = bytearray(p_function(hmacs[0], label, m))
    for fn in hmacs[1:]:
        for i, b in enumerate(p_function(fn, label, m)):
            acc[i] ^= b
    return bytes(acc[:out_len])


def software_hmac(key: bytes, func: PrfHash) -> HmacFn:
    """HMAC over a key held in host memory (endpoints and the software key store)."""
    name = digest_name(func)

    def fn(data: bytes) -> bytes:
        return _hmac.new(key, data, name).digest()

    return fn


def split_in_key(key: bytes) -> list[bytes]:
    """Split an in-key into the 256-bit slices s_1..s_n of RFC 3830 4.1.2."""
    if not key:
        raise ValueError("PRF in-key must not be empty")
    return [key[i : i + IN_KEY_SLICE] for i in range(0, len(key), IN_KEY_SLICE)]


def prf(key: bytes, label: bytes, out_len: int, func: PrfHash = PrfFunc.MIKEY_1) -> bytes:
    """The MIKEY PRF with an in-key in host memory."""
    return prf_over([software_hmac(s, func) for s in split_in_key(key)], label, out_len, func)


def software_prf(key: bytes, func: PrfHash) -> KeyedPrf:
    """A KeyedPrf over a key held in host memory."""

    def fn(label: bytes, out_len: int) -> bytes:
        return prf(key, label, out_len, func)

    return fn


__all__ = [
    "IN_KEY_SLICE",
    "HmacFn",
    "KeyedPrf",
    "PrfFunc",
    "PrfHash",
    "block_bytes",
    "digest_name",
    "hmac_digest",
    "prf_outputs",
    "p_function",
    "prf",
    "prf_over",
    "software_hmac",
    "software_prf",
    "split_in_key",
]
