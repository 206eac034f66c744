"""Message protection shared by the KMS and endpoints: algorithm suites, message keys,
KEMAC sealing/opening and V MACs (RFC 3830 4.1.4, 4.2.3; RFC 6043 5.1.2, 5.4, 6.2).

Key operations go through a :class:`~kms.keystore.KeyOps`: the KMS passes its token-backed
store (so PRFs and AES-CM run on the token), endpoints a software one.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from kms.keystore import Key, KeyOps
from kms.mikey.chain import decode_key_data
from kms.mikey.cipher import CryptoError, compute_mac, decrypt_kemac_data, encrypt_kemac_data
from kms.mikey.compose import compose_as
from kms.mikey.constants import MAC_LENGTH, DataType, EncrAlg, MacAlg, PrfFunc, TsType
from kms.mikey.coverage import covered_prefix, seal, seal_wire
from kms.mikey.derive import (
    KeyDirection,
    MessageKeys,
    derive_exchange_keys,
    derive_message_keys,
)
from kms.mikey.errors import DecodeError
from kms.mikey.message import Message
from kms.mikey.ntp import timestamp_t64
from kms.mikey.payloads import Kemac, KeyData, Timestamp, Verification
from kms.mikey.prf import KeyedPrf, hmac_digest
from kms.mikey.views import RequestResp, ResolveResp
from kms.mikey.writer import key_data_chain


@dataclass(frozen=True)
class Suite:
    """The algorithms that protect a message. RFC 6043 12.1: the 256-bit algorithms are used
    together and never mixed with the 128-bit ones."""

    prf_func: PrfFunc
    encr_alg: EncrAlg
    mac_alg: MacAlg


SUITE_128 = Suite(PrfFunc.MIKEY_1, EncrAlg.AES_CM_128, MacAlg.HMAC_SHA_1_160)
SUITE_256 = Suite(PrfFunc.PRF_HMAC_SHA_256, EncrAlg.AES_CM_256, MacAlg.HMAC_SHA_256_256)


def suite_for(prf_func: int) -> Suite:
    """The suite that goes with a PRF func; ValueError for an unknown PRF."""
    if prf_func == PrfFunc.MIKEY_1:
        return SUITE_128
    if prf_func == PrfFunc.PRF_HMAC_SHA_256:
        return SUITE_256
    raise ValueError(f"unsupported PRF func {prf_func}")


class _StorePrf:
    """A KeyedPrf computed by the key store, with ``many`` for several outputs in one
    key-store operation (:func:`kms.mikey.prf.prf_outputs`)."""

    __slots__ = ("_func", "_key", "_ks")

    def __init__(self, ks: KeyOps, key: Key, func: PrfFunc) -> None:
        self._ks, self._key, self._func = ks, key, hmac_digest(func)

    def __call__(self, label: bytes, out_len: int) -> bytes:
        return self._ks.prf(self._key, label, out_len, self._func)

    def many(self, requests: Sequence[tuple[bytes, int]]) -> list[bytes]:
        return self._ks.prf_many(self._key, requests, self._func)


def keyed_prf(ks: KeyOps, key: Key, func: PrfFunc) -> KeyedPrf:
    """A KeyedPrf computed by the key store (token HMACs for the KMS)."""
    return _StorePrf(ks, key, func)


def t64_of(t: Timestamp) -> bytes:
    """The 64-bit form of a T payload used in AES-CM IVs (RFC 3830 4.2.3; RFC 6043 6.3)."""
    return timestamp_t64(TsType(t.ts_type), t.value)


def _last_v(msg: Message) -> Verification:
    """RFC 6043 5.4: the V MAC covers everything before it, so V must be the last payload."""
    last = msg.payloads[-1] if msg.payloads else None
    if not isinstance(last, Verification):
        raise DecodeError("V", len(msg.wire), "the last payload must be V")
    return last


# --- keys, KEMAC, V ----------------------------------------------------------------------


def message_keys(
    ks: KeyOps,
    key: Key,
    msg: Message,
    direction: KeyDirection,
    rand_i: bytes | None,
    rand_r: bytes | None,
    suite: Suite,
) -> MessageKeys:
    """encr/auth/salt keys of a message from a PSK, envelope key or MPK (RFC 6043 5.1.2),
    with the message's CSB ID and the HDR PRF (RFC 3830 6.1; RFC 6043 5.1.2 names none)."""
    prf = keyed_prf(ks, key, PrfFunc(msg.header.prf_func))
    return derive_message_keys(
        prf, msg.header.csb_id, direction, rand_i, rand_r, suite.encr_alg, suite.mac_alg
    )


def exchange_keys(
    ks: KeyOps,
    key: Key,
    msg: Message,
    rand_i: bytes | None,
    rand_r: bytes | None,
    initial: Suite,
    response: Suite,
) -> tuple[MessageKeys, MessageKeys]:
    """The initial message's keys (0x01, for the ``initial`` suite's algorithms) and its
    response's (0x02) from one PSK or envelope key, in one key-store operation
    (RFC 6043 5.1.2, the HDR PRF of ``msg`` as in :func:`message_keys`)."""
    prf = keyed_prf(ks, key, PrfFunc(msg.header.prf_func))
    return derive_exchange_keys(
        prf, msg.header.csb_id, rand_i, rand_r,
        (initial.encr_alg, initial.mac_alg), (response.encr_alg, response.mac_alg),
    )


def seal_kemac(
    ks: KeyOps,
    keys: MessageKeys,
    encr_alg: EncrAlg,
    csb_id: int,
    t64: bytes,
    key_data: Sequence[KeyData],
) -> Kemac:
    """KEMAC = E(encr_key, key data...) with MAC alg NULL: integrity comes from V
    (RFC 6043 6.2). AES-CM runs in the key store."""
    return Kemac(encr_alg, encrypt_key_data(ks, keys, encr_alg, csb_id, t64, key_data),
                 MacAlg.NULL, b"")


def encrypt_key_data(
    ks: KeyOps,
    keys: MessageKeys,
    encr_alg: EncrAlg,
    csb_id: int,
    t64: bytes,
    key_data: Sequence[KeyData],
) -> bytes:
    """A KEMAC's Encr data: the Key data chain encrypted with ``keys`` (RFC 3830 4.2.3,
    6.2), AES-CM in the key store; what :func:`seal_kemac` puts in its KEMAC, for a sender
    that writes the KEMAC itself (kms.mikey.writer)."""
    return encrypt_kemac_data(
        encr_alg, keys.encr_key, keys.salt_key, csb_id, t64, key_data_chain(key_data), ks.aes_cm
    )


def open_kemac(
    ks: KeyOps, kemac: Kemac, keys: MessageKeys, csb_id: int, t64: bytes
) -> tuple[KeyData, ...]:
    """Decrypt and parse a KEMAC; CryptoError for anything wrong (opaque to the sender)."""
    try:
        encr_alg = EncrAlg(kemac.encr_alg)
        plaintext = decrypt_kemac_data(
            encr_alg, keys.encr_key, keys.salt_key, csb_id, t64, kemac.encr_data, ks.aes_cm
        )
        return decode_key_data(plaintext)
    except (ValueError, DecodeError) as exc:
        raise CryptoError("KEMAC cannot be decrypted or parsed") from exc


def placeholder_v(mac_alg: MacAlg) -> Verification:
    """A V payload with a zero MAC of the right length, to be filled by :func:`seal_mac`."""
    return Verification(mac_alg, bytes(MAC_LENGTH[mac_alg]))


def seal_mac(msg: Message, keys: MessageKeys, mac_alg: MacAlg, extra: bytes) -> Message:
    """Fill the V MAC over the covered bytes || extra (identities or the initial message)."""
    return seal(msg, lambda data: compute_mac(mac_alg, keys.auth_key, data), extra)


def seal_mac_wire(msg: Message, keys: MessageKeys, mac_alg: MacAlg, extra: bytes) -> bytes:
    """:func:`seal_mac` when only the bytes are needed (a KMS response): not decoded again."""
    return seal_wire(msg, lambda data: compute_mac(mac_alg, keys.auth_key, data), extra)


def check_mac(msg: Message, keys: MessageKeys, suite: Suite, extra: bytes) -> bool:
    """Verify the V MAC of a received message over its received bytes (RFC 6043 5.4).

    The V Auth alg must be the suite's: a NULL MAC is never accepted.
    """
    v = _last_v(msg)
    if v.mac_alg != suite.mac_alg or v.mac_alg == MacAlg.NULL:
        return False
    expected = compute_mac(suite.mac_alg, keys.auth_key, covered_prefix(msg) + extra)
    return hmac.compare_digest(expected, v.mac)


class ResponseRejected(Exception):
    """A response to our initial message does not verify; ``reason`` says why (no secrets)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Response = RequestResp | ResolveResp


def open_response(
    ks: KeyOps,
    data: bytes,
    expected: type[Response],
    initial: Message,
    key: Key,
    suite: Suite,
    rand_i: bytes | None,
    rand_r: bytes | None,
) -> tuple[Response, tuple[KeyData, ...]]:
    """Verify a REQUEST_RESP / RESOLVE_RESP against the initial message it answers and open its
    KEMAC (RFC 6043 4.2.1.6, 4.2.3.6): decoded and composed as RFC 6043 lays it out, same CSB
    ID, V MAC over response || initial message with the 0x02 keys from ``key``. Used by
    endpoints and by a KMS that resolved through a peer. Returns the response's typed view
    and the KEMAC's key data; raises ResponseRejected."""
    try:
        msg = Message.decode(data)
    except DecodeError as exc:
        raise ResponseRejected(f"undecodable: {exc}") from None
    if msg.data_type == DataType.ERROR:
        raise ResponseRejected("answered with an error message")
    if msg.data_type != expected.DATA_TYPE or msg.header.csb_id != initial.header.csb_id:
        raise ResponseRejected(
            f"not a {expected.DATA_TYPE.name} to our {DataType(initial.data_type).name}"
        )
    try:
        resp = compose_as(msg, expected)
    except DecodeError as exc:
        raise ResponseRejected(f"malformed: {exc}") from None
    keys = message_keys(ks, key, initial, KeyDirection.RESPONSE, rand_i, rand_r, suite)
    if not check_mac(msg, keys, suite, initial.wire):
        raise ResponseRejected("MAC verification failed")
    try:
        key_data = open_kemac(ks, resp.kemac, keys, msg.header.csb_id, t64_of(resp.t))
    except CryptoError:
        raise ResponseRejected("KEMAC cannot be decrypted") from None
    return resp, key_data
