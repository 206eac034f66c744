"""Resolving an opened MIKEY base ticket (RFC 6043 4.2.3.5, 5.1.1, 6.10): the key content of
RESOLVE_RESP, with key forking bound to the resolving Responder's identity.

Shared by the KMS (Ticket Resolve) and by a Responder that holds the ticket protection key
and resolves locally (modes 2 and 4 of RFC 6043 4.1.1).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field

from kms.keystore import KeyOps
from kms.mikey.base_ticket import TicketContents, TicketError, derive_mpk_pair, derive_mpki
from kms.mikey.cipher import compute_mac
from kms.mikey.constants import KeyDataType, MacAlg, PrfFunc
from kms.mikey.derive import (
    derive_forked_tgk,
    derive_vr_key_and_forked_mpkr,
)
from kms.mikey.payloads import KeyData
from kms.mikey.protect import keyed_prf, suite_for
from kms.mikey.ticket import Ticket, TpFlag

TGK_TYPES = frozenset({KeyDataType.TGK, KeyDataType.TGK_SALT})


@dataclass(frozen=True)
class Resolution:
    """MPKi || [MPKr'] || {TEK|TGK'|GTGK} and, with forking, the modifier RANDRkms."""

    keys: tuple[KeyData, ...] = field(repr=False)
    rand_kms: bytes | None

    @property
    def mpki(self) -> bytes:
        return self.keys[0].key

    @property
    def forked_mpkr(self) -> bytes | None:
        return self.keys[1].key if self.rand_kms is not None else None

    @property
    def session_keys(self) -> tuple[KeyData, ...]:
        return self.keys[2:] if self.rand_kms is not None else self.keys[1:]


def _check_vr_alg(ticket: Ticket) -> MacAlg:
    init = ticket.initiator_data
    if init is None:
        raise TicketError("forking ticket without Initiator Data")
    suite = suite_for(ticket.policy.prf_func)
    if init.vr.mac_alg != suite.mac_alg or init.vr.mac_alg == MacAlg.NULL:
        raise TicketError("Vr uses an unexpected MAC algorithm")
    return suite.mac_alg


def _check_vr(ticket: Ticket, mac_alg: MacAlg, key: bytes) -> None:
    init = ticket.initiator_data
    assert init is not None  # _check_vr_alg ran first
    expected = compute_mac(mac_alg, key, init.vr_mac_input())
    if not hmac.compare_digest(expected, init.vr.mac):
        raise TicketError("Initiator Data Vr verification failed")


def resolve_ticket_keys(
    ks: KeyOps,
    ticket: Ticket,
    contents: TicketContents,
    responder: bytes,
    modifier: Callable[[int], bytes] | None = None,
) -> Resolution:
    """The keys a resolver hands to ``responder`` (RFC 6043 4.2.3.5, 5.1.1): forking (I = 1)
    forks MPKr and every TGK with the responder's ID Data and RANDRkms; GTGKs and TEKs are
    never forked. ``modifier(n)`` gives the n-byte RANDRkms (the KMS: a keyed function of
    the ticket and the responder, kms.core.forking); without it, a fresh random one."""
    tp_prf = PrfFunc(ticket.policy.prf_func)
    mpk = contents.mpk
    if not ticket.policy.flags & TpFlag.I:  # no forking: MPKi only (MPKr is not used)
        mpki = derive_mpki(ks, mpk.key, contents.rand, tp_prf)
        return Resolution((KeyData(KeyDataType.MPK, mpki, None, mpk.kv),
                           *contents.session_keys), None)
    mpki, mpkr = derive_mpk_pair(ks, mpk.key, contents.rand, tp_prf)
    keys = [KeyData(KeyDataType.MPK, mpki, None, mpk.kv)]
    mac_alg = _check_vr_alg(ticket)
    longest = max([len(mpkr), *(len(k.key) for k in contents.session_keys)])
    n = max(16, longest)  # RFC 6043 12.1: RANDRkms >= longest MPKr/TGK
    rand_kms = modifier(n) if modifier is not None else ks.random(n)
    # Vr key and MPKr' come from the same MPKr: one key-store call; MPKr' is used only
    # once Vr has verified.
    vr_key, forked = derive_vr_key_and_forked_mpkr(
        keyed_prf(ks, mpkr, tp_prf), mac_alg, responder, rand_kms, len(mpkr)
    )
    _check_vr(ticket, mac_alg, vr_key)
    keys.append(KeyData(KeyDataType.MPK, forked, None, mpk.kv))
    for k in contents.session_keys:
        if k.key_type in TGK_TYPES:
            tgk = derive_forked_tgk(keyed_prf(ks, k.key, tp_prf), responder, rand_kms, len(k.key))
            keys.append(KeyData(k.key_type, tgk, k.salt, k.kv))
        else:
            keys.append(k)
    return Resolution(tuple(keys), rand_kms)
