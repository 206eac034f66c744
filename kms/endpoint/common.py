"""Building and checking the messages an endpoint exchanges with a KMS (RFC 6043 4.2.1,
4.2.3): the initial message with its V MAC, and the response's MAC and KEMAC."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from kms.endpoint.session import EndpointError
from kms.keystore import KeyOps
from kms.mikey.constants import DataType, IdType, TsType
from kms.mikey.derive import KeyDirection, MessageKeys
from kms.mikey.header import EmptyMap, Header
from kms.mikey.message import Message
from kms.mikey.ntp import decode_ts_value, encode_ts_value
from kms.mikey.payloads import KeyData, Payload, Timestamp
from kms.mikey.protect import (
    Response,
    ResponseRejected,
    Suite,
    message_keys,
    open_response,
    placeholder_v,
    seal_mac,
)


@dataclass(frozen=True)
class Credentials:
    """An endpoint's identity and the PSK it shares with its KMS (RFC 6043 4.2.1.2)."""

    identity: bytes
    psk: bytes = field(repr=False)
    kms_id: bytes
    id_type: int = IdType.URI
    kms_id_type: int = IdType.URI
    # The PSK version this PSK is, as `kms endpoint rotate-psk` printed it (RFC 6043 4.2.1:
    # IDRpsk names the PSK used); sent as IDRpsk when set. None: the registered PSK.
    psk_name: bytes | None = None


def new_csb_id() -> int:
    """RFC 3830 5.1: a random CSB ID."""
    return secrets.randbits(32)


def now_timestamp(now: float, ts_type: TsType = TsType.NTP_UTC) -> Timestamp:
    return Timestamp(ts_type, encode_ts_value(ts_type, now))


def initial_message(
    ks: KeyOps,
    data_type: DataType,
    csb_id: int,
    prf_func: int,
    payloads: Sequence[Payload],
    key: bytes,
    suite: Suite,
    rand_i: bytes | None,
    rand_r: bytes | None,
    extra: bytes,
) -> tuple[Message, MessageKeys]:
    """HDR (Empty map, V = 1 as 4.2.1.1 / 4.2.3.1 say) + payloads + V sealed with ``key``."""
    header = Header(data_type, csb_id, EmptyMap(0), True, prf_func)
    draft = Message(header, (*payloads, placeholder_v(suite.mac_alg)))
    keys = message_keys(ks, key, draft, KeyDirection.INITIAL, rand_i, rand_r, suite)
    return seal_mac(draft, keys, suite.mac_alg, extra), keys


def accept_kms_response(
    ks: KeyOps,
    data: bytes,
    expected: type[Response],
    initial: Message,
    key: bytes,
    suite: Suite,
    rand_i: bytes | None,
    rand_r: bytes | None,
) -> tuple[Response, tuple[KeyData, ...]]:
    """Verify a REQUEST_RESP / RESOLVE_RESP against the initial message and open its KEMAC;
    its typed view and key data.

    RFC 6043 4.2.1.6: a response that does not verify is discarded (EndpointError here).
    """
    try:
        return open_response(ks, data, expected, initial, key, suite, rand_i, rand_r)
    except ResponseRejected as exc:
        raise EndpointError(f"KMS response rejected: {exc.reason}") from None


def check_fresh(t: Timestamp, now: float, window: float) -> None:
    """RFC 3830 5.4: the sender's timestamp (its T) must be within the window of our clock."""
    if t.ts_type == TsType.COUNTER:
        return
    if abs(decode_ts_value(TsType(t.ts_type), t.value) - now) > window:
        raise EndpointError("timestamp outside the accepted window")
