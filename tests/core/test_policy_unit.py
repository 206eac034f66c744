"""Ticket policy as a pure function: RFC 6043 6.10 flag rules and
grant_policy's honour / change (flag K) / refuse (Invalid TPpar, Invalid TICKET, Invalid ID)
decisions, without a KMS around it."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kms.core.api import Outcome
from kms.core.errors import Refusal
from kms.core.policy import Forking, Grant, KmsPolicy, check_flag_rules, grant_policy
from kms.endpoint.initiator import DEFAULT_FLAGS
from kms.mikey.chain import encode_key_data
from kms.mikey.constants import (
    EncrAlg,
    ErrorNo,
    IdRole,
    IdType,
    KeyDataType,
    MacAlg,
    PrfFunc,
    TicketType,
    TsRole,
    TsType,
)
from kms.mikey.ntp import decode_ts_value, encode_ts_value
from kms.mikey.payloads import Kemac, KeyData, Payload
from kms.mikey.ticket import Idr, TicketPolicy, TpFlag, Tr

KMS = b"sip:kms.example.org"
ALICE = Idr(IdRole.IDRI, IdType.URI, b"sip:alice@example.org")
BOB = Idr(IdRole.IDRR, IdType.URI, b"sip:bob@example.org")
CAROL = Idr(IdRole.IDRR, IdType.URI, b"sip:carol@example.org")
NOW = 1_800_000_000.0
POL = KmsPolicy(kms_id=KMS)
F = TpFlag
FORKING = F.E | F.F | F.G | F.H | F.I


def tr(role: TsRole, unix: float, ts_type: TsType = TsType.NTP_UTC_32) -> Tr:
    return Tr(role, ts_type, encode_ts_value(ts_type, unix))


def kemac_for(keys: Sequence[KeyData]) -> Kemac:
    return Kemac(EncrAlg.NULL, encode_key_data(keys), MacAlg.NULL, b"")


def tre_default() -> Tr:
    return tr(TsRole.TRE, NOW + POL.default_lifetime_s)


def grant(
    flags: TpFlag = DEFAULT_FLAGS,
    payloads: Sequence[Payload] | None = None,
    *,
    pol: KmsPolicy = POL,
    keys: Sequence[KeyData] = (),
    supplied: bool = False,
    prf: int = PrfFunc.MIKEY_1,
    known: frozenset[bytes] | None = None,
    applications: frozenset[bytes] = frozenset(),
    tp: TicketPolicy | None = None,
) -> Grant:
    # Default: a desired TP the KMS grants unchanged (a TRe inside the policy, one IDRr).
    data = list((tre_default(), BOB) if payloads is None else payloads)
    if keys:
        data.insert(0, kemac_for(keys))
    desired = tp or TicketPolicy(prf_func=prf, flags=flags, payloads=tuple(data))
    return grant_policy(
        desired,
        initiator=ALICE,
        pol=pol,
        now=NOW,
        requested_keys=tuple(keys),
        keys_supplied=supplied,
        is_known=None if known is None else known.__contains__,
        applications=applications,
    )


def refused(error_no: ErrorNo, reason: str, **kw: object) -> Refusal:
    with pytest.raises(Refusal) as ei:
        grant(**kw)  # type: ignore[arg-type]
    r = ei.value
    assert (r.error_no, r.outcome) == (error_no, Outcome.DENIED), (r.error_no, r.reason)
    assert reason in r.reason, r.reason
    return r


def window(g: Grant) -> tuple[float | None, float]:
    """(TRs or None, TRe) of a granted policy; the KMS always sets TRe."""
    trs = {p.role: p for p in g.policy.payloads if isinstance(p, Tr)}
    assert set(trs) <= {TsRole.TRS, TsRole.TRE} and TsRole.TRE in trs

    def at(t: Tr) -> float:
        return decode_ts_value(TsType(t.ts_type), t.value)

    start = at(trs[TsRole.TRS]) if TsRole.TRS in trs else None
    return start, at(trs[TsRole.TRE])


# --- check_flag_rules: each RFC 6043 6.10 dependency ---------------------------------------


@pytest.mark.parametrize(
    ("flags", "has_tgk", "why"),
    [
        (F.E | F.H | F.N, False, "D=0) needs L=1"),
        (F.D | F.G | F.H, False, "G=1 needs F=1"),
        (F.D | F.F, False, "G=0 needs H=1"),
        (F.D | F.F | F.G | F.I, False, "forking (I=1) needs E=1"),
        (F.E | F.F | F.G | F.K | F.L, False, "K=1 needs D=1"),
        (F.D | F.H | F.M, False, "M=1 needs F=1"),
        (F.D | F.E | F.H | F.I, True, "forking a TGK needs F=1"),
    ],
    ids=["D0-L0", "G1-F0", "G0-H0", "I1-E0", "K1-D0", "M1-F0", "I1-TGK-F0"],
)
def test_each_flag_rule_is_enforced(flags: TpFlag, has_tgk: bool, why: str) -> None:
    result = check_flag_rules(flags, has_tgk)
    assert result is not None and why in result, result


@pytest.mark.parametrize(
    ("flags", "has_tgk"),
    [
        (DEFAULT_FLAGS | F.D, True),
        (FORKING | F.D, True),
        (F.E | F.H | F.L, False),  # Initiator-made ticket: L set
        (F.D | F.E | F.H | F.I, False),  # forking without a TGK needs no TRANSFER_RESP
        (F.D | F.E | F.F | F.G | F.K | F.M, True),
    ],
)
def test_consistent_flags_pass(flags: TpFlag, has_tgk: bool) -> None:
    assert check_flag_rules(flags, has_tgk) is None


# --- grant_policy: what is honoured ---------------------------------------------------------


def test_default_grant() -> None:
    g = grant()
    p = g.policy
    assert (p.ticket_type, p.subtype, p.version) == (TicketType.MIKEY_BASE_TICKET, 1, 1)
    assert p.flags == DEFAULT_FLAGS | F.D and not g.changed
    assert [x for x in p.payloads if isinstance(x, Idr)] == [
        Idr(IdRole.IDRKMS, IdType.URI, KMS),
        ALICE,
        BOB,
    ]
    assert window(g) == (None, NOW + POL.default_lifetime_s)
    # No desired KEMAC: a single TGK (RFC 6043 4.2.1.5), 128 bits with MIKEY-1.
    assert [(k.key_type, k.length) for k in g.keys] == [(KeyDataType.TGK, 16)]


def test_256_bit_prf_defaults_to_256_bit_keys() -> None:
    g = grant(prf=PrfFunc.PRF_HMAC_SHA_256)
    assert g.policy.prf_func == PrfFunc.PRF_HMAC_SHA_256
    assert g.keys[0].length == 32


def test_desired_d_and_k_are_the_kms_s_to_set() -> None:
    g = grant(DEFAULT_FLAGS | F.K)
    assert g.policy.flags & F.D and not g.policy.flags & F.K


def test_requested_keys_are_honoured() -> None:
    keys = [
        KeyData(KeyDataType.TEK_SALT, bytes(16), bytes(12)),
        KeyData(KeyDataType.GTGK, bytes(32), None),
    ]
    g = grant(keys=keys)
    assert [(k.key_type, k.length, k.salt_length) for k in g.keys] == [
        (KeyDataType.TEK_SALT, 16, 12),
        (KeyDataType.GTGK, 32, None),
    ]
    assert not g.changed


def test_desired_validity_inside_the_policy_is_kept() -> None:
    g = grant(payloads=(tr(TsRole.TRS, NOW + 60), tr(TsRole.TRE, NOW + 600), BOB))
    assert window(g) == (NOW + 60, NOW + 600) and not g.changed


# --- grant_policy: what the KMS changes (and says so with K) -----------------------------


def test_missing_e_is_set_and_flagged() -> None:
    g = grant(F.F | F.G | F.H)
    assert g.policy.flags & F.E and g.policy.flags & F.K and g.changed


def test_too_long_validity_is_capped() -> None:
    g = grant(payloads=(tr(TsRole.TRE, NOW + 10 * POL.max_lifetime_s), BOB))
    assert window(g)[1] == NOW + POL.max_lifetime_s
    assert g.policy.flags & F.K


def test_forking_required_by_policy() -> None:
    pol = KmsPolicy(kms_id=KMS, forking=Forking.REQUIRED)
    g = grant(F.E | F.H, pol=pol)  # no F: forking the default TGK needs it (6.10)
    assert g.policy.flags & (F.I | F.F | F.K) == F.I | F.F | F.K
    assert check_flag_rules(g.policy.flags, True) is None


def test_forking_forbidden_by_policy() -> None:
    g = grant(FORKING, pol=KmsPolicy(kms_id=KMS, forking=Forking.FORBIDDEN))
    assert not g.policy.flags & F.I and g.policy.flags & F.K


def test_reuse_not_allowed_clears_j() -> None:
    g = grant(DEFAULT_FLAGS | F.J, pol=KmsPolicy(kms_id=KMS, reuse_allowed=False))
    assert not g.policy.flags & F.J and g.policy.flags & F.K


def test_unknown_responders_are_dropped_when_they_must_be_known() -> None:
    pol = KmsPolicy(kms_id=KMS, responders_must_be_known=True)
    g = grant(payloads=(BOB, CAROL), pol=pol, known=frozenset({BOB.data}))
    assert [x for x in g.policy.payloads if isinstance(x, Idr) and x.role == IdRole.IDRR] == [BOB]
    assert g.policy.flags & F.K


def test_unauthorised_applications_are_dropped() -> None:
    ok = Idr(IdRole.IDRAPP, IdType.URI, b"app:ok")
    bad = Idr(IdRole.IDRAPP, IdType.URI, b"app:bad")
    g = grant(payloads=(ok, bad, BOB), applications=frozenset({ok.data}))
    assert [x for x in g.policy.payloads if isinstance(x, Idr) and x.role == IdRole.IDRAPP] == [ok]
    assert g.policy.flags & F.K


# --- grant_policy: what is refused ------------------------------------------------------------


@pytest.mark.parametrize(
    ("ticket_type", "subtype", "version"),
    [(TicketType.THREEGPP_BASE_TICKET, 1, 1), (1, 0, 1), (1, 1, 0), (0xF001, 1, 1)],
)
def test_other_ticket_types_are_invalid_ticket(
    ticket_type: int, subtype: int, version: int
) -> None:
    tp = TicketPolicy(ticket_type, subtype, version, 0, DEFAULT_FLAGS, (BOB,))
    refused(ErrorNo.INVALID_TICKET, "desired ticket type", tp=tp)


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (F.E | F.F, "G=0 needs H=1"),
        (F.F | F.G | F.H | F.I, "forking (I=1) needs E=1"),
        (F.E | F.H | F.M, "M=1 needs F=1"),
        (F.E | F.H | F.G, "G=1 needs F=1"),
        (F.E | F.H | F.I, "forking a TGK needs F=1"),
    ],
)
def test_inconsistent_desired_flags_are_invalid_tppar(flags: TpFlag, why: str) -> None:
    refused(ErrorNo.INVALID_TPPAR, why, flags=flags)


def test_prf_outside_the_policy_is_changed_and_flagged() -> None:
    # RFC 6043 6.10: the KMS may change the desired TP; it grants its strongest PRF.
    g = grant(prf=5)
    assert g.policy.prf_func == PrfFunc.PRF_HMAC_SHA_256 and g.policy.flags & F.K
    pol = KmsPolicy(kms_id=KMS, prf_funcs=frozenset({PrfFunc.PRF_HMAC_SHA_256}))
    g = grant(pol=pol)
    assert g.policy.prf_func == PrfFunc.PRF_HMAC_SHA_256 and g.policy.flags & F.K
    assert g.keys[0].length == 32  # the granted PRF's default key length (RFC 6043 12.1)


def test_reserved_bits_are_invalid_tppar() -> None:
    tp = TicketPolicy(flags=DEFAULT_FLAGS, payloads=(BOB,), reserved=0x01)
    refused(ErrorNo.INVALID_TPPAR, "reserved", tp=tp)


def test_no_responder_is_invalid_tppar() -> None:
    refused(ErrorNo.INVALID_TPPAR, "no responder", payloads=())
    refused(ErrorNo.INVALID_TPPAR, "no responder", payloads=(tr(TsRole.TRE, NOW + 60),))


def test_another_kms_in_tp_data_is_invalid_id() -> None:
    other = Idr(IdRole.IDRKMS, IdType.URI, b"sip:kms.elsewhere.example.net")
    refused(ErrorNo.INVALID_ID, "another KMS", payloads=(other, BOB))


def test_no_known_responder_is_invalid_id() -> None:
    pol = KmsPolicy(kms_id=KMS, responders_must_be_known=True)
    refused(ErrorNo.INVALID_ID, "unknown responders", pol=pol, known=frozenset())


def test_no_authorised_application_is_invalid_id() -> None:
    app = Idr(IdRole.IDRAPP, IdType.URI, b"app:bad")
    refused(ErrorNo.INVALID_ID, "application", payloads=(app, BOB), applications=frozenset({b"ok"}))


@pytest.mark.parametrize(
    ("keys", "why"),
    [
        ([KeyData(KeyDataType.MPK, bytes(16))], "key type"),
        ([KeyData(KeyDataType.TEK_SALT, bytes(24), bytes(12))], "key length 24"),
    ],
    ids=["MPK", "supplied-length-24"],
)
def test_ungrantable_keys_are_invalid_tppar(keys: list[KeyData], why: str) -> None:
    refused(ErrorNo.INVALID_TPPAR, why, keys=keys, supplied=why != "key type")


def test_empty_desired_kemac_is_invalid_tppar() -> None:
    tp = TicketPolicy(flags=DEFAULT_FLAGS, payloads=(kemac_for([]), BOB))
    refused(ErrorNo.INVALID_TPPAR, "must list", tp=tp)


def test_key_type_outside_the_policy_is_invalid_tppar() -> None:
    pol = KmsPolicy(kms_id=KMS, key_types=frozenset({KeyDataType.TGK}))
    refused(ErrorNo.INVALID_TPPAR, "key type", pol=pol, keys=[KeyData(KeyDataType.TEK, bytes(16))])


def test_supplied_keys_other_than_teks_are_invalid_tppar() -> None:
    keys = [KeyData(KeyDataType.TGK, bytes(range(16)))]
    refused(ErrorNo.INVALID_TPPAR, "only TEKs", keys=keys, supplied=True, flags=DEFAULT_FLAGS)


def test_supplied_keys_refused_by_policy_are_invalid_tppar() -> None:
    pol = KmsPolicy(kms_id=KMS, initiator_keys_allowed=False)
    keys = [KeyData(KeyDataType.TEK, bytes(range(16)))]
    refused(ErrorNo.INVALID_TPPAR, "not allowed", keys=keys, supplied=True, pol=pol)


@pytest.mark.parametrize(
    ("payloads", "why"),
    [
        ((tr(TsRole.TRE, NOW - 1), BOB), "ends before it starts or in the past"),
        ((tr(TsRole.TRS, NOW + 600), tr(TsRole.TRE, NOW + 300), BOB), "ends before it starts"),
        ((tr(TsRole.TRS, NOW + 2 * POL.max_lifetime_s), BOB), "too far in the future"),
        ((Tr(TsRole.TRE, TsType.COUNTER, bytes(4)), BOB), "NTP timestamps"),
    ],
    ids=["ends-in-past", "ends-before-start", "starts-too-late", "counter"],
)
def test_unusable_validity_is_invalid_tppar(payloads: tuple[Payload, ...], why: str) -> None:
    refused(ErrorNo.INVALID_TPPAR, why, payloads=payloads)


def test_refusals_never_carry_key_values() -> None:
    secret = bytes(range(0xA0, 0xB0))
    with pytest.raises(Refusal) as ei:
        grant(keys=[KeyData(KeyDataType.TGK, secret)], supplied=True)
    r = ei.value
    for text in (str(r), r.detail, r.reason, repr(r)):
        assert secret.hex() not in text and secret.hex().upper() not in text
