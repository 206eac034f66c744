"""Flag K (RFC 6043 6.10: "the KMS changed the desired ticket policy or the desired KEMAC"):
K = 1 exactly when the granted TP (flags other than D and K, PRF, TP Data other than KEMAC)
or the granted keys (types, lengths, number) differ from what the desired TP means; K = 0
when they are equal. Pure grant_policy cases first, then whole Ticket Requests."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kms.core.policy import Forking, Grant, KmsPolicy, grant_policy
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy
from kms.mikey.chain import encode_key_data
from kms.mikey.constants import (
    EncrAlg,
    IdRole,
    IdType,
    KeyDataType,
    MacAlg,
    PrfFunc,
    TsRole,
    TsType,
)
from kms.mikey.ntp import encode_ts_value
from kms.mikey.payloads import Kemac, KeyData, Payload
from kms.mikey.ticket import Idr, TicketPolicy, TpFlag, Tr
from tests.core.world import BOB, World

KMS = b"sip:kms.example.org"
ALICE = Idr(IdRole.IDRI, IdType.URI, b"sip:alice@example.org")
BOB_R = Idr(IdRole.IDRR, IdType.URI, BOB)
CAROL_R = Idr(IdRole.IDRR, IdType.URI, b"sip:carol@example.org")
APP = Idr(IdRole.IDRAPP, IdType.URI, b"urn:example:voice")
NOW = 1_800_000_000.0
POL = KmsPolicy(kms_id=KMS)
F = TpFlag


def tr(role: TsRole, unix: float, ts_type: TsType = TsType.NTP_UTC_32) -> Tr:
    return Tr(role, ts_type, encode_ts_value(ts_type, unix))


TRE = tr(TsRole.TRE, NOW + 3600)


def kemac(keys: Sequence[KeyData]) -> Kemac:
    return Kemac(EncrAlg.NULL, encode_key_data(keys), MacAlg.NULL, b"")


def grant(
    payloads: Sequence[Payload],
    *,
    flags: TpFlag = DEFAULT_FLAGS,
    prf: int = PrfFunc.MIKEY_1,
    keys: Sequence[KeyData] = (),
    pol: KmsPolicy = POL,
    known: frozenset[bytes] | None = None,
    applications: frozenset[bytes] = frozenset(),
) -> Grant:
    data = list(payloads)
    if keys:
        data.append(kemac(keys))
    return grant_policy(
        TicketPolicy(prf_func=prf, flags=flags, payloads=tuple(data)),
        initiator=ALICE,
        pol=pol,
        now=NOW,
        requested_keys=tuple(keys),
        is_known=None if known is None else known.__contains__,
        applications=applications,
    )


def k_of(g: Grant) -> bool:
    k = bool(g.policy.flags & F.K)
    assert k == g.changed
    return k


# --- K = 0: the granted policy is the desired one ---------------------------------------------


@pytest.mark.parametrize(
    "payloads",
    [
        (TRE, BOB_R),
        (tr(TsRole.TRS, NOW + 60), TRE, BOB_R),
        # TRs / TRe honoured are kept as sent, whatever their NTP type (no re-encoding).
        (
            tr(TsRole.TRS, NOW - 5.5, TsType.NTP_UTC),
            tr(TsRole.TRE, NOW + 99.25, TsType.NTP_UTC),
            BOB_R,
        ),
        (TRE, tr(TsRole.TRR, 300), APP, BOB_R, CAROL_R),
        # Explicit IDRkms / IDRi equal to what the KMS fills in, in any order.
        (BOB_R, TRE, Idr(IdRole.IDRI, IdType.URI, ALICE.data), Idr(IdRole.IDRKMS, IdType.URI, KMS)),
    ],
    ids=["tre", "trs-tre", "ntp64", "trr-app-two-responders", "explicit-ids"],
)
def test_honoured_policy_has_k_0(payloads: tuple[Payload, ...]) -> None:
    g = grant(payloads, applications=frozenset({APP.data}))
    assert not k_of(g)
    for p in payloads:  # every desired payload is in the granted TP unchanged
        if isinstance(p, Tr):
            assert p in g.policy.payloads


def test_honoured_keys_have_k_0() -> None:
    keys = [
        KeyData(KeyDataType.TEK_SALT, bytes(16), bytes(14)),
        KeyData(KeyDataType.TGK, b"", None),  # length 0: the KMS's default, any is honoured
        KeyData(KeyDataType.GTGK, bytes(32), None),
    ]
    g = grant((TRE, BOB_R), keys=keys)
    assert not k_of(g)
    assert [(k.key_type, k.length) for k in g.keys] == [
        (KeyDataType.TEK_SALT, 16),
        (KeyDataType.TGK, 16),
        (KeyDataType.GTGK, 32),
    ]


def test_no_desired_kemac_gets_the_default_tgk_without_k() -> None:
    # RFC 6043 4.2.1.5: without a desired KEMAC the KMS's default (one TGK) is no change.
    g = grant((TRE, BOB_R))
    assert [k.key_type for k in g.keys] == [KeyDataType.TGK] and not k_of(g)


# --- the defect as found: no TRs asked -------------------------------------------------------


def test_omitted_trs_stays_omitted() -> None:
    # RFC 6043 6.10: an omitted TRs means no lower bound. The KMS used to add
    # TRs = now and leave K = 0; it now grants no lower bound, which is what was asked.
    g = grant((TRE, BOB_R))
    assert not any(isinstance(p, Tr) and p.role == TsRole.TRS for p in g.policy.payloads)
    assert not k_of(g)


def test_omitted_tre_is_a_change() -> None:
    # An omitted TRe means no upper bound; the KMS always bounds a ticket (max lifetime), so
    # the TRe it adds is a change the Initiator must be told about.
    g = grant((BOB_R,))
    assert k_of(g)
    assert tr(TsRole.TRE, NOW + POL.default_lifetime_s) in g.policy.payloads


# --- K = 1: every kind of change ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "what"),
    [
        ({"flags": DEFAULT_FLAGS & ~F.E}, "E set"),
        ({"flags": DEFAULT_FLAGS | F.J, "pol": KmsPolicy(kms_id=KMS, reuse_allowed=False)}, "J"),
        ({"pol": KmsPolicy(kms_id=KMS, forking=Forking.REQUIRED)}, "I set"),
        ({"prf": PrfFunc.MIKEY_1, "pol": KmsPolicy(kms_id=KMS, prf_funcs=frozenset({1}))}, "PRF"),
        ({"payloads": (tr(TsRole.TRE, NOW + 10 * 86400), BOB_R)}, "TRe capped"),
        ({"payloads": (tr(TsRole.TRI, NOW), TRE, BOB_R)}, "TRi dropped"),
        ({"payloads": (Idr(IdRole.IDRI, IdType.URI, b"sip:mallory@x"), TRE, BOB_R)}, "IDRi"),
        ({"payloads": (TRE, BOB_R, CAROL_R), "known": frozenset({BOB})}, "IDRr dropped"),
        (
            {"payloads": (TRE, APP, Idr(IdRole.IDRAPP, IdType.URI, b"urn:x"), BOB_R)},
            "IDRapp dropped",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_policy_changes_set_k(kw: dict[str, object], what: str) -> None:
    args: dict[str, object] = {"payloads": (TRE, BOB_R), **kw}
    if "known" in kw:
        args["pol"] = KmsPolicy(kms_id=KMS, responders_must_be_known=True)
    g = grant(applications=frozenset({APP.data}), **args)  # type: ignore[arg-type]
    assert k_of(g), what


@pytest.mark.parametrize(
    ("keys", "pol", "granted"),
    [
        # A length the KMS does not issue is replaced by its default.
        ([KeyData(KeyDataType.TGK, bytes(24))], POL, [(KeyDataType.TGK, 16)]),
        # A key type the KMS does not issue is dropped.
        (
            [KeyData(KeyDataType.TEK, bytes(16)), KeyData(KeyDataType.GTGK, bytes(16))],
            KmsPolicy(kms_id=KMS, key_types=frozenset({KeyDataType.TEK})),
            [(KeyDataType.TEK, 16)],
        ),
        # Keys beyond max_session_keys are dropped.
        ([KeyData(KeyDataType.TEK, bytes(16))] * 9, POL, [(KeyDataType.TEK, 16)] * 8),
        # A salt length outside 1..32 becomes the KMS's salt length.
        ([KeyData(KeyDataType.TEK_SALT, bytes(16), bytes(40))], POL, [(KeyDataType.TEK_SALT, 16)]),
    ],
    ids=["length-24", "type-dropped", "nine-keys", "salt-40"],
)
def test_key_changes_set_k(
    keys: list[KeyData], pol: KmsPolicy, granted: list[tuple[int, int]]
) -> None:
    g = grant((TRE, BOB_R), keys=keys, pol=pol)
    assert [(k.key_type, k.length) for k in g.keys] == granted
    assert k_of(g)


# --- whole Ticket Requests: what the Initiator sees --------------------------------------


def test_request_without_trs_gets_no_trs_and_k_0(world: World) -> None:
    g = world.grant(DesiredPolicy(responders=(BOB,), lifetime_s=1800))
    assert not g.policy.flags & F.K
    assert [p.role for p in g.policy.payloads if isinstance(p, Tr)] == [TsRole.TRE]
    keys, call, _ = world.call(g, BOB)  # a ticket without TRs resolves
    assert keys[0].key_and_salt == call.srtp[0].key_and_salt


def test_request_whose_key_length_is_changed_sees_k_and_the_real_length(world: World) -> None:
    desired = DesiredPolicy(
        responders=(BOB,), lifetime_s=1800, key_types=(KeyDataType.TEK_SALT,), key_length=24
    )
    g = world.grant(desired)
    assert g.policy.flags & F.K
    assert [(k.key_type, len(k.key)) for k in g.session_keys] == [(KeyDataType.TEK_SALT, 16)]
    audit = world.audit()[-1]
    assert audit["event"] == "ticket.issued" and audit["policy_changed"] is True
