"""The MIKEY base ticket (RFC 6043 Appendix A): issuing and opening, over a key store.

Ticket Data = THDR, T, RAND, KEMAC, [IDRpsk], V. The KEMAC holds MPK || {TEK|TGK|GTGK}
encrypted with keys from the TPK (label type 0x05, CSB ID 0xFFFFFFFF and the Ticket Data T in
the IV); V is a MAC from the TPK over the TICKET payload from Ticket Type to the end of
Ticket Data (Initiator Data excluded). MPKi and MPKr come from the MPK (label type 0x06).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kms.keystore import Key, KeyOps
from kms.mikey.cipher import CryptoError, compute_mac
from kms.mikey.constants import MAC_LENGTH, KeyDataType, MacAlg, PrfFunc, PrfLabel, TsType
from kms.mikey.derive import ALL_CSB, derive_mpki_mpkr, derive_ticket_keys, mpk_label
from kms.mikey.errors import DecodeError
from kms.mikey.ntp import timestamp_t64
from kms.mikey.payloads import KeyData, Timestamp
from kms.mikey.protect import encrypt_key_data, keyed_prf, open_kemac, suite_for
from kms.mikey.ticket import Ticket, TicketPolicy
from kms.mikey.writer import base_ticket_head, ticket_body


class TicketError(Exception):
    """The ticket cannot be opened: unknown TPK, bad MAC, malformed or undecryptable.

    ``reason`` is for the audit log; the peer only learns that the ticket was refused.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TicketContents:
    """What a base ticket carries, once opened."""

    mpk: KeyData = field(repr=False)
    session_keys: tuple[KeyData, ...] = field(repr=False)
    t: Timestamp
    rand: bytes
    tpk_id: bytes | None


SESSION_KEY_TYPES = frozenset(
    {
        KeyDataType.TGK,
        KeyDataType.TGK_SALT,
        KeyDataType.TEK,
        KeyDataType.TEK_SALT,
        KeyDataType.GTGK,
        KeyDataType.GTGK_SALT,
    }
)


@dataclass(frozen=True)
class IssuedTicket:
    """A base ticket just issued: its Ticket Data and the TICKET payload body as sent (TP
    fields, Ticket Data, Initiator Data length 0), written once (kms.mikey.writer)."""

    policy: TicketPolicy
    ticket_data: bytes = field(repr=False)
    body: bytes = field(repr=False)

    def ticket(self) -> Ticket:
        return Ticket(self.policy, self.ticket_data)


def issue_ticket(
    ks: KeyOps,
    tpk: Key,
    tpk_id: bytes,
    policy: TicketPolicy,
    t: Timestamp,
    rand: bytes,
    mpk: KeyData,
    session_keys: Sequence[KeyData],
) -> IssuedTicket:
    """Build a TICKET payload (Initiator Data empty, RFC 6043 6.10) protected by ``tpk``:
    KEMAC = E(keys from the TPK, MPK || session keys) with the Ticket Data T in the IV
    (RFC 6043 A.2.1), then V."""
    suite = suite_for(policy.prf_func)
    keys = derive_ticket_keys(
        keyed_prf(ks, tpk, PrfFunc(policy.prf_func)), rand, suite.encr_alg, suite.mac_alg
    )
    t64 = timestamp_t64(TsType(t.ts_type), t.value)
    encr = encrypt_key_data(ks, keys, suite.encr_alg, ALL_CSB, t64, [mpk, *session_keys])
    head = base_ticket_head(t.ts_type, t.value, rand, suite.encr_alg, encr, tpk_id,
                            suite.mac_alg)
    # V is the last field of Ticket Data, its MAC the last bytes: the MAC covers the TICKET
    # payload from Ticket Type to the end of Ticket Data minus the MAC (RFC 6043 A.1; no
    # Initiator Data yet): the TP fields, the Ticket Data length and ``head``.
    n = MAC_LENGTH[suite.mac_alg]
    covered = ticket_body(policy.encode_body(), head + bytes(n))[: -2 - n]
    mac = compute_mac(suite.mac_alg, keys.auth_key, covered)
    return IssuedTicket(policy, head + mac, covered + mac + b"\x00\x00")


def issue_base_ticket(
    ks: KeyOps,
    tpk: Key,
    tpk_id: bytes,
    policy: TicketPolicy,
    t: Timestamp,
    rand: bytes,
    mpk: KeyData,
    session_keys: Sequence[KeyData],
) -> Ticket:
    """:func:`issue_ticket` as a :class:`Ticket` payload."""
    return issue_ticket(ks, tpk, tpk_id, policy, t, rand, mpk, session_keys).ticket()


def open_base_ticket(
    ks: KeyOps, ticket: Ticket, tpk_for: Callable[[bytes | None], Key | None]
) -> TicketContents:
    """Verify and decrypt a base ticket. ``tpk_for(IDRpsk data)`` names the TPK (None: no
    such key). Raises TicketError for every failure; the MAC is checked before decrypting."""
    try:
        data = ticket.base_ticket()
        suite = suite_for(ticket.policy.prf_func)
    except (DecodeError, ValueError) as exc:
        raise TicketError(f"malformed ticket: {exc}") from None
    tpk_id = data.idr_psk.data if data.idr_psk is not None else None
    tpk = tpk_for(tpk_id)
    if tpk is None:
        raise TicketError("unknown or retired TPK version")
    keys = derive_ticket_keys(
        keyed_prf(ks, tpk, PrfFunc(ticket.policy.prf_func)),
        data.rand.value,
        suite.encr_alg,
        suite.mac_alg,
    )
    if data.v.mac_alg != suite.mac_alg or data.v.mac_alg == MacAlg.NULL:
        raise TicketError("ticket MAC algorithm does not match the ticket PRF")
    expected = compute_mac(suite.mac_alg, keys.auth_key, ticket.mac_input(data))
    if not hmac.compare_digest(expected, data.v.mac):
        raise TicketError("ticket MAC verification failed")
    if data.kemac.encr_alg != suite.encr_alg:
        raise TicketError("ticket KEMAC encryption does not match the ticket PRF")
    t64 = timestamp_t64(TsType(data.t.ts_type), data.t.value)
    try:
        key_data = open_kemac(ks, data.kemac, keys, ALL_CSB, t64)
    except CryptoError:
        raise TicketError("ticket KEMAC cannot be decrypted") from None
    if not key_data or key_data[0].key_type != KeyDataType.MPK:
        raise TicketError("ticket KEMAC must start with the MPK")
    rest = key_data[1:]
    if any(k.key_type not in SESSION_KEY_TYPES for k in rest):
        raise TicketError("ticket KEMAC holds an unexpected key type")
    return TicketContents(key_data[0], rest, data.t, data.rand.value, tpk_id)


def ticket_id(ticket_data: bytes) -> str:
    """A stable, non-secret handle for a ticket: what the audit log records and `kms call`
    prints (first 128 bits of SHA-256 over Ticket Data, in hex)."""
    return hashlib.sha256(ticket_data).hexdigest()[:32]


def derive_mpk_pair(
    ks: KeyOps, mpk: bytes, rand: bytes, prf_func: PrfFunc
) -> tuple[bytes, bytes]:
    """(MPKi, MPKr) from the ticket MPK and the Ticket Data RAND (RFC 6043 A.2.2)."""
    return derive_mpki_mpkr(keyed_prf(ks, mpk, prf_func), rand, len(mpk))


def derive_mpki(ks: KeyOps, mpk: bytes, rand: bytes, prf_func: PrfFunc) -> bytes:
    """MPKi alone (RFC 6043 A.2.2): what a REQUEST_RESP without forking carries (MPKr is
    sent only with flag I, RFC 6043 4.2.1.5); the same value as ``derive_mpk_pair(...)[0]``."""
    return keyed_prf(ks, mpk, prf_func)(mpk_label(PrfLabel.MPKI, rand), len(mpk))
