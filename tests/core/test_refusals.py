"""Errors and abuse (issue 4): every way the KMS core refuses a request.

For each path: the exact Outcome and MIKEY error number (reference 1.8); a MIKEY error message
(HDR, T, ERR, [V]: RFC 6043 5.4) that decodes and is composed as RFC 6043 says, with the
request's CSB ID; a V only once the sender was authenticated (then verifiable with the
sender's response keys, reference 8); no key material in the error message, the detail or
the audit log; exactly one audit record for the refusal; and a KMS that still serves the next
valid request.
"""

from __future__ import annotations

import base64
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsm.pkcs11_store import RECONNECT_INTERVAL
from kms.core.api import KmsReply, Outcome
from kms.core.service import Kms
from kms.endpoint.common import Credentials, initial_message, new_csb_id, now_timestamp
from kms.endpoint.initiator import (
    DEFAULT_FLAGS,
    RAND_LENGTH,
    DesiredPolicy,
    Initiator,
    PendingRequest,
    TicketGrant,
)
from kms.endpoint.session import CryptoSession, EndpointError, SrtpKeys
from kms.mikey.buffer import Reader
from kms.mikey.compose import InitialMessage, RequestInit, compose, sender_of
from kms.mikey.constants import (
    DataType,
    ErrorNo,
    IdRole,
    IdType,
    KeyDataType,
    RandRole,
    TicketType,
    TsRole,
    TsType,
)
from kms.mikey.derive import KeyDirection
from kms.mikey.header import Header
from kms.mikey.message import Message
from kms.mikey.ntp import encode_ts_value
from kms.mikey.payloads import Error, KeyData, Payload, Verification
from kms.mikey.protect import SUITE_128, check_mac, message_keys, suite_for
from kms.mikey.ticket import Idr, RandR, Ticket, TicketPolicy, TpFlag, Tr
from kms.store.memory import TokenBucketRateLimiter
from tests.core.world import ALICE, BOB, CAROL, DAVE, KMS_ID, PSKS, TEAM, World

FORKING = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I
SESSIONS = (CryptoSession(1, 0x0A0B0C0D),)
MALLORY = b"sip:mallory@example.org"
OTHER_KMS = b"sip:kms.elsewhere.example.net"


# --- what every refusal must look like --------------------------------------------------


@dataclass(frozen=True)
class Signer:
    """The authenticated sender of the refused message: its PSK and the message in error.
    The error's V must verify with that sender's response-message keys (reference 8)."""

    psk: bytes
    initial: bytes


def csb_of(wire: bytes) -> int:
    """The CSB ID of a request whose HDR decodes (even if the rest does not)."""
    header, _ = Header.decode(Reader(wire))
    return header.csb_id


def key_material(
    grants: Iterable[TicketGrant] = (),
    srtp: Iterable[SrtpKeys] = (),
    keys: Iterable[KeyData] = (),
) -> list[bytes]:
    out: list[bytes] = []
    for g in grants:
        out += [g.mpki, *([g.mpkr] if g.mpkr is not None else [])]
        out += [k.key for k in g.session_keys]
    for s in srtp:
        out += [s.master_key, s.master_salt]
    out += [k.key for k in keys]
    return out


def assert_no_leak(world: World, reply: KmsReply, secrets: Iterable[bytes]) -> None:
    """No PSK, MPK or session key in the error message, the detail or the audit log, as
    bytes, hex (either case) or base64."""
    log_bytes = (world.home.path / "audit.log").read_bytes()
    texts = [reply.detail, log_bytes.decode("utf-8"), repr(reply.audit), repr(reply)]
    blobs = [reply.error_message or b"", log_bytes, reply.detail.encode()]
    for secret in [*PSKS.values(), *secrets]:
        assert len(secret) >= 14
        forms = (secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode())
        for text in texts:
            for form in forms:
                assert form not in text, "key material leaked into a text"
        for blob in blobs:
            assert secret not in blob, "key material leaked into bytes"


def expect_refusal(
    world: World,
    send: Callable[[], KmsReply],
    outcome: Outcome,
    error_no: ErrorNo,
    *,
    csb_id: int | None,
    signer: Signer | None = None,
    reason: str | None = None,
    secrets: Iterable[bytes] = (),
) -> Message:
    """Send one request and check the refusal; returns the decoded error message."""
    before = len(world.audit())
    reply = send()
    assert reply.outcome is outcome, (reply.outcome, reply.detail, reply.audit)
    assert not reply.ok and reply.data == b""
    assert "\n" not in reply.detail and reply.detail

    # The MIKEY error message: HDR, T, (ERR), [V] (RFC 6043 5.4, reference 5.1).
    assert reply.error_message is not None
    err = Message.decode(reply.error_message)
    assert err.data_type == DataType.ERROR
    compose(err)
    assert [e.error_no for e in err.all(Error)] == [error_no]
    assert not err.header.v_flag  # reference 14.4: V = 0 in errors
    if csb_id is not None:
        assert err.header.csb_id == csb_id
    v = err.first(Verification)
    if signer is None:
        # The sender was not authenticated: nothing keyed to its claimed identity.
        assert v is None, "unauthenticated sender got a V in the error message"
    else:
        assert v is not None, "authenticated sender got no V in the error message"
        initial = Message.decode(signer.initial)
        view = compose(initial)
        assert isinstance(view, InitialMessage)
        rand = sender_of(view)[1].value
        request = isinstance(view, RequestInit)
        suite = suite_for(initial.header.prf_func)
        keys = message_keys(
            world.sw,
            signer.psk,
            initial,
            KeyDirection.RESPONSE,
            rand if request else None,
            None if request else rand,
            suite,
        )
        assert check_mac(err, keys, suite, b""), "error V does not verify (reference 8)"

    # Exactly one audit record, naming the decision and why.
    records = world.audit()
    assert len(records) == before + 1, records[before:]
    rec = records[-1]
    assert rec["event"] == "refused"
    assert rec["outcome"] == outcome.value
    assert rec["error_no"] == int(error_no)
    assert isinstance(rec["reason"], str) and rec["reason"]
    if reason is not None:
        assert reason in rec["reason"], rec["reason"]
    assert reply.audit == rec

    assert_no_leak(world, reply, secrets)
    return err


def serves(world: World, who: bytes = ALICE) -> list[bytes]:
    """The KMS still serves: a full request / transfer / resolve. Returns its keys."""
    grant = world.grant(DesiredPolicy(responders=(BOB,)), who=who)
    keys_a, call, _ = world.call(grant, BOB, who=who)
    assert keys_a[0].key_and_salt == call.srtp[0].key_and_salt
    return key_material([grant], keys_a)


# --- building (and breaking) messages ---------------------------------------------------


def seal_request(
    world: World,
    payloads: Sequence[Payload],
    *,
    who: bytes = ALICE,
    rand_i: bytes,
    data_type: DataType = DataType.REQUEST_INIT_PSK,
    kms_id: bytes = KMS_ID,
) -> bytes:
    """A REQUEST_INIT_PSK with the given payloads (V appended), MAC'd with ``who``'s PSK."""
    msg, _ = initial_message(
        world.sw,
        data_type,
        new_csb_id(),
        SUITE_128.prf_func,
        payloads,
        PSKS[who],
        SUITE_128,
        rand_i,
        None,
        who + kms_id,
    )
    return msg.wire


def request_with_tp(
    world: World, tp: TicketPolicy, who: bytes = ALICE
) -> tuple[bytes, PendingRequest]:
    rand_i = world.sw.random(RAND_LENGTH)
    payloads: list[Payload] = [
        now_timestamp(world.now),
        RandR(RandRole.RANDRI, rand_i),
        Idr(IdRole.IDRI, IdType.URI, who),
        Idr(IdRole.IDRKMS, IdType.URI, KMS_ID),
        tp,
    ]
    wire = seal_request(world, payloads, who=who, rand_i=rand_i)
    return wire, PendingRequest(Message.decode(wire), rand_i)


def flip(wire: bytes, pos: int) -> bytes:
    b = bytearray(wire)
    b[pos] ^= 0x01
    return bytes(b)


def replace_ticket(ti: bytes, change: Callable[[Ticket], Ticket]) -> bytes:
    """Re-encode a TRANSFER_INIT with its TICKET changed. Its own MAC goes stale, which the
    Responder only notices after the resolve; the RESOLVE_INIT it builds is sealed properly."""
    msg = Message.decode(ti)
    ticket = msg.one(Ticket)
    payloads = tuple(change(ticket) if p is ticket else p for p in msg.payloads)
    return Message(msg.header, payloads).encode()


def resolve_init(
    world: World,
    grant: TicketGrant,
    resolver: bytes,
    responder: bytes | None = None,
    *,
    now: float | None = None,
    change_ticket: Callable[[Ticket], Ticket] | None = None,
) -> bytes:
    """TRANSFER_INIT from Alice to ``responder``, turned into ``resolver``'s RESOLVE_INIT."""
    at = world.now if now is None else now
    ti, _ = world.initiator().transfer_init(grant, at, responder or resolver, SESSIONS)
    if change_ticket is not None:
        ti = replace_ticket(ti, change_ticket)
    ri, _ = world.responder(resolver).receive_transfer_init(ti, at)
    return ri


def signer(who: bytes, wire: bytes) -> Signer:
    return Signer(PSKS[who], wire)


# --- gather: undecodable, wrong type, wrong composition ---------------------------------


@pytest.mark.parametrize("to", ["request", "resolve"])
def test_random_garbage_is_malformed(world: World, to: str) -> None:
    garbage = bytes.fromhex("deadbeef") * 9
    send = world.kms.request_ticket if to == "request" else world.kms.resolve_ticket  # type: ignore[attr-defined]
    expect_refusal(
        world,
        lambda: send(garbage, world.now),
        Outcome.MALFORMED,
        ErrorNo.UNSPECIFIED,
        csb_id=0,
    )
    serves(world)


def test_truncated_request_init_is_malformed(world: World) -> None:
    wire, _ = world.initiator().request_ticket(DesiredPolicy(responders=(BOB,)), world.now)
    for cut in (len(wire) - 1, len(wire) // 2, 11):
        expect_refusal(
            world,
            lambda cut=cut: world.request(ALICE, wire[:cut]),  # type: ignore[misc]
            Outcome.MALFORMED,
            ErrorNo.UNSPECIFIED,
            csb_id=csb_of(wire),  # the HDR is intact: the error answers that CSB
        )
    # Nothing was remembered of the fragments: the whole message is still accepted.
    assert world.request(ALICE, wire).ok
    serves(world)


def test_resolve_init_sent_to_request_ticket_is_invalid_dt(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(BOB,)))
    ri = resolve_init(world, grant, BOB)
    expect_refusal(
        world,
        lambda: world.request(BOB, ri),
        Outcome.MALFORMED,
        ErrorNo.INVALID_DT,
        csb_id=csb_of(ri),
        secrets=key_material([grant]),
    )
    # Refused before authentication: the same RESOLVE_INIT still resolves where it belongs.
    assert world.resolve(ri).ok
    serves(world)


def test_request_init_sent_to_resolve_ticket_is_invalid_dt(world: World) -> None:
    wire, _ = world.initiator().request_ticket(DesiredPolicy(responders=(BOB,)), world.now)
    expect_refusal(
        world,
        lambda: world.resolve(wire),
        Outcome.MALFORMED,
        ErrorNo.INVALID_DT,
        csb_id=csb_of(wire),
    )
    assert world.request(ALICE, wire).ok
    serves(world)


@pytest.mark.parametrize("to", ["request", "resolve"])
def test_transfer_init_sent_to_the_kms_is_invalid_dt(world: World, to: str) -> None:
    grant = world.grant(DesiredPolicy(responders=(BOB,)))
    ti, _ = world.initiator().transfer_init(grant, world.now, BOB, SESSIONS)
    send = world.kms.request_ticket if to == "request" else world.kms.resolve_ticket  # type: ignore[attr-defined]
    expect_refusal(
        world,
        lambda: send(ti, world.now),
        Outcome.MALFORMED,
        ErrorNo.INVALID_DT,
        csb_id=csb_of(ti),
        secrets=key_material([grant]),
    )
    serves(world)


@pytest.mark.parametrize("how", ["reordered", "missing TP", "two TPs"])
def test_composition_errors_are_malformed(world: World, how: str) -> None:
    """Properly MAC'd messages whose payloads break RFC 6043 4.2.1.2's layout."""
    rand_i = world.sw.random(RAND_LENGTH)
    tp = TicketPolicy(flags=DEFAULT_FLAGS, payloads=(Idr(IdRole.IDRR, IdType.URI, BOB),))
    t = now_timestamp(world.now)
    randr = RandR(RandRole.RANDRI, rand_i)
    idri = Idr(IdRole.IDRI, IdType.URI, ALICE)
    payloads: list[Payload] = {
        "reordered": [randr, t, idri, tp],
        "missing TP": [t, randr, idri],
        "two TPs": [t, randr, idri, tp, tp],
    }[how]
    wire = seal_request(world, payloads, rand_i=rand_i)
    Message.decode(wire)  # the codec accepts it: only the composition check refuses it
    expect_refusal(
        world,
        lambda: world.request(ALICE, wire),
        Outcome.MALFORMED,
        ErrorNo.UNSPECIFIED,
        csb_id=csb_of(wire),
        reason="payload",
    )
    serves(world)


# --- authentication ------------------------------------------------------------------------


def test_flipped_v_mac_is_an_auth_failure_without_v(world: World) -> None:
    wire, _ = world.initiator().request_ticket(DesiredPolicy(responders=(BOB,)), world.now)
    bad = flip(wire, len(wire) - 1)
    expect_refusal(
        world,
        lambda: world.request(ALICE, bad),
        Outcome.UNAUTHENTICATED,
        ErrorNo.AUTH_FAILURE,
        csb_id=csb_of(wire),
        reason="MAC",
    )
    # No state before the MAC: the genuine message is not taken for a replay.
    assert world.request(ALICE, wire).ok
    serves(world)


@pytest.mark.parametrize("where", ["RANDRi", "TP"])
def test_flipped_covered_byte_is_an_auth_failure(world: World, where: str) -> None:
    wire, _ = world.initiator().request_ticket(DesiredPolicy(responders=(BOB,)), world.now)
    msg = Message.decode(wire)
    if where == "RANDRi":
        randr = msg.one(RandR)
        pos = msg.offset_of(randr) + 3  # NP, role, len, then the RAND
    else:
        tp = msg.one(TicketPolicy)
        pos = msg.offset_of(tp) + len(tp.raw) - 2  # inside the IDRr's ID Data
    bad = flip(wire, pos)
    assert Message.decode(bad).data_type == DataType.REQUEST_INIT_PSK
    expect_refusal(
        world,
        lambda: world.request(ALICE, bad),
        Outcome.UNAUTHENTICATED,
        ErrorNo.AUTH_FAILURE,
        csb_id=csb_of(wire),
        reason="MAC",
    )
    assert world.request(ALICE, wire).ok
    serves(world)


def test_unknown_identity_is_an_opaque_auth_failure(world: World) -> None:
    # Same answer as a wrong MAC, so nobody can probe which identities are registered.
    creds = Credentials(MALLORY, bytes(range(16)), KMS_ID)
    wire, _ = Initiator(creds, world.sw).request_ticket(DesiredPolicy(responders=(BOB,)), world.now)
    expect_refusal(
        world,
        lambda: world.request(MALLORY, wire),
        Outcome.UNAUTHENTICATED,
        ErrorNo.AUTH_FAILURE,
        csb_id=csb_of(wire),
        reason="unknown identity",
        secrets=[creds.psk],
    )
    serves(world)


def test_right_identity_wrong_psk_is_an_auth_failure(world: World) -> None:
    wrong = Credentials(ALICE, PSKS[BOB], KMS_ID)  # Bob's PSK claiming to be Alice
    wire, _ = Initiator(wrong, world.sw).request_ticket(DesiredPolicy(responders=(BOB,)), world.now)
    expect_refusal(
        world,
        lambda: world.request(ALICE, wire),
        Outcome.UNAUTHENTICATED,
        ErrorNo.AUTH_FAILURE,
        csb_id=csb_of(wire),
        reason="MAC",
    )
    serves(world)


def test_idrkms_naming_another_kms_is_invalid_id(world: World) -> None:
    creds = Credentials(ALICE, PSKS[ALICE], OTHER_KMS)
    wire, _ = Initiator(creds, world.sw).request_ticket(DesiredPolicy(responders=(BOB,)), world.now)
    expect_refusal(
        world,
        lambda: world.request(ALICE, wire),
        Outcome.DENIED,
        ErrorNo.INVALID_ID,
        csb_id=csb_of(wire),
    )
    serves(world)


# --- timestamps and replays ----------------------------------------------------------------


@pytest.mark.parametrize("skew", [-1000, +1000])
def test_stale_or_future_timestamp_is_invalid_ts(world: World, skew: int) -> None:
    wire, _ = world.initiator().request_ticket(DesiredPolicy(responders=(BOB,)), world.now + skew)
    expect_refusal(
        world,
        lambda: world.request(ALICE, wire),
        Outcome.PRECONDITION,
        ErrorNo.INVALID_TS,
        csb_id=csb_of(wire),
        reason="timestamp off by",
        signer=signer(ALICE, wire),  # the MAC is verified before the timestamp is judged
    )
    serves(world)


def test_replayed_request_init_is_invalid_ts(world: World) -> None:
    ini = world.initiator()
    wire, pending = ini.request_ticket(DesiredPolicy(responders=(BOB,)), world.now)
    first = world.request(ALICE, wire)
    assert first.ok
    grant = ini.accept_ticket(pending, first.data, world.now)
    expect_refusal(
        world,
        lambda: world.request(ALICE, wire),
        Outcome.PRECONDITION,
        ErrorNo.INVALID_TS,
        csb_id=csb_of(wire),
        signer=signer(ALICE, wire),  # the MAC was verified before the replay check
        reason="replay",
        secrets=key_material([grant]),
    )
    serves(world)


def test_replayed_resolve_init_is_invalid_ts(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(BOB,), flags=DEFAULT_FLAGS | TpFlag.J))
    ri = resolve_init(world, grant, BOB)
    assert world.resolve(ri).ok
    expect_refusal(
        world,
        lambda: world.resolve(ri),
        Outcome.PRECONDITION,
        ErrorNo.INVALID_TS,
        csb_id=csb_of(ri),
        signer=signer(BOB, ri),
        reason="replay",
        secrets=key_material([grant]),
    )
    serves(world)


# --- ticket resolve: who, when, how often --------------------------------------------------


def test_unauthorised_responder_is_invalid_id_with_a_verifiable_v(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(BOB,)))
    ri = resolve_init(world, grant, DAVE, responder=BOB)  # Dave got hold of Bob's ticket
    expect_refusal(
        world,
        lambda: world.resolve(ri),
        Outcome.DENIED,
        ErrorNo.INVALID_ID,
        csb_id=csb_of(ri),
        signer=signer(DAVE, ri),
        reason="not an authorised responder",
        secrets=key_material([grant]),
    )
    # Bob, the named responder, still resolves the same ticket.
    keys_a, call, _ = world.call(grant, BOB)
    assert keys_a[0].key_and_salt == call.srtp[0].key_and_salt
    serves(world)


def test_group_member_removed_after_issue_is_refused_at_once(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(TEAM,), flags=FORKING))
    keys_b, call_b, _ = world.call(grant, TEAM, resolver=BOB)
    world.home.registry.remove_group_members(TEAM, [CAROL])
    ri = resolve_init(world, grant, CAROL, responder=TEAM)
    expect_refusal(
        world,
        lambda: world.resolve(ri),
        Outcome.DENIED,
        ErrorNo.INVALID_ID,
        csb_id=csb_of(ri),
        signer=signer(CAROL, ri),
        secrets=key_material([grant], keys_b, call_b.session_keys),
    )
    serves(world)


def test_expired_ticket_is_invalid_ts(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(BOB,), lifetime_s=60))
    later = world.now + 1000  # TRe + 940 s; the RESOLVE_INIT itself is fresh
    ri = resolve_init(world, grant, BOB, now=later)
    expect_refusal(
        world,
        lambda: world.resolve(ri, now=later),
        Outcome.PRECONDITION,
        ErrorNo.INVALID_TS,
        csb_id=csb_of(ri),
        signer=signer(BOB, ri),
        reason="expired",
        secrets=key_material([grant]),
    )
    world.now = later  # the KMS clock never runs backwards (see test_stores)
    serves(world)


def test_not_yet_valid_ticket_is_invalid_ts(world: World) -> None:
    start = world.now + 3600
    tp = TicketPolicy(
        flags=DEFAULT_FLAGS,
        payloads=(
            Tr(TsRole.TRS, TsType.NTP_UTC_32, encode_ts_value(TsType.NTP_UTC_32, start)),
            Idr(IdRole.IDRR, IdType.URI, BOB),
        ),
    )
    ini = world.initiator()
    wire, pending = request_with_tp(world, tp)
    reply = world.request(ALICE, wire)
    assert reply.ok, reply.audit
    grant = ini.accept_ticket(pending, reply.data, world.now)
    ri = resolve_init(world, grant, BOB)
    expect_refusal(
        world,
        lambda: world.resolve(ri),
        Outcome.PRECONDITION,
        ErrorNo.INVALID_TS,
        csb_id=csb_of(ri),
        signer=signer(BOB, ri),
        reason="not yet valid",
        secrets=key_material([grant]),
    )
    # Once its validity has started, the same ticket resolves.
    world.now = start + 1
    ri = resolve_init(world, grant, BOB)
    assert world.resolve(ri).ok
    serves(world)


def test_non_reusable_ticket_resolves_once_per_responder(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(TEAM,), flags=FORKING))
    assert not grant.policy.flags & TpFlag.J
    keys_b, call_b, _ = world.call(grant, TEAM, resolver=BOB)
    ri = resolve_init(world, grant, BOB, responder=TEAM)  # new CSB, new RANDRr: no replay
    expect_refusal(
        world,
        lambda: world.resolve(ri),
        Outcome.PRECONDITION,
        ErrorNo.UNSPECIFIED,
        csb_id=csb_of(ri),
        signer=signer(BOB, ri),
        reason="already resolved",
        secrets=key_material([grant], keys_b, call_b.session_keys),
    )
    # Another member of the group may still resolve it once.
    keys_c, call_c, _ = world.call(grant, TEAM, resolver=CAROL)
    assert keys_c[0].key_and_salt == call_c.srtp[0].key_and_salt
    serves(world)


# --- ticket policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("desired", "reason"),
    [
        (DesiredPolicy((BOB,), flags=TpFlag.E | TpFlag.F), "G=0 needs H=1"),
        (DesiredPolicy((BOB,), flags=TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I), "needs E=1"),
        (DesiredPolicy((BOB,), flags=TpFlag.E | TpFlag.H | TpFlag.M), "M=1 needs F=1"),
        (DesiredPolicy(()), "no responder"),
        (DesiredPolicy((BOB,), key_types=(KeyDataType.MPK,), key_length=16), "key type"),
    ],
    ids=["G0-H0", "I1-E0", "M1-F0", "no-IDRr", "key-type-MPK"],
)
def test_ungrantable_policy_is_invalid_tppar(
    world: World, desired: DesiredPolicy, reason: str
) -> None:
    wire, _ = world.initiator().request_ticket(desired, world.now)
    expect_refusal(
        world,
        lambda: world.request(ALICE, wire),
        Outcome.DENIED,
        ErrorNo.INVALID_TPPAR,
        csb_id=csb_of(wire),
        signer=signer(ALICE, wire),
        reason=reason,
    )
    serves(world)


@pytest.mark.parametrize(
    ("ticket_type", "subtype", "version"),
    [(TicketType.THREEGPP_BASE_TICKET, 1, 1), (1, 2, 1), (1, 1, 2), (0xF000, 1, 1)],
)
def test_unsupported_ticket_type_is_invalid_ticket(
    world: World, ticket_type: int, subtype: int, version: int
) -> None:
    tp = TicketPolicy(
        ticket_type, subtype, version, 0, DEFAULT_FLAGS, (Idr(IdRole.IDRR, IdType.URI, BOB),)
    )
    wire, _ = request_with_tp(world, tp)
    expect_refusal(
        world,
        lambda: world.request(ALICE, wire),
        Outcome.DENIED,
        ErrorNo.INVALID_TICKET,
        csb_id=csb_of(wire),
        signer=signer(ALICE, wire),
        reason="ticket type",
    )
    serves(world)


# --- forged and stale tickets ----------------------------------------------------------------


def _flip_ticket_data(ticket: Ticket) -> Ticket:
    """Flip one byte of the base ticket's KEMAC ciphertext (structure stays valid)."""
    base = ticket.base_ticket()
    pos = ticket.ticket_data.index(base.kemac.encr_data) + 3
    return Ticket(ticket.policy, flip(ticket.ticket_data, pos), ticket.initiator_data)


def test_forged_ticket_is_an_auth_failure(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(BOB,)))
    ri = resolve_init(world, grant, BOB, change_ticket=_flip_ticket_data)
    assert Message.decode(ri).one(Ticket).ticket_data != grant.ticket.ticket_data
    expect_refusal(
        world,
        lambda: world.resolve(ri),
        Outcome.UNAUTHENTICATED,
        ErrorNo.AUTH_FAILURE,
        csb_id=csb_of(ri),
        signer=signer(BOB, ri),  # Bob himself was authenticated; only the ticket is bad
        reason="ticket MAC",
        secrets=key_material([grant]),
    )
    keys_a, call, _ = world.call(grant, BOB)  # the genuine ticket still resolves
    assert keys_a[0].key_and_salt == call.srtp[0].key_and_salt
    serves(world)


def test_ticket_of_a_retired_tpk_is_refused(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(BOB,)))
    world.home.rotate_tpk()
    world.home.retire_tpk(1)
    ri = resolve_init(world, grant, BOB)
    expect_refusal(
        world,
        lambda: world.resolve(ri),
        Outcome.UNAUTHENTICATED,
        ErrorNo.AUTH_FAILURE,
        csb_id=csb_of(ri),
        signer=signer(BOB, ri),
        reason="retired TPK",
        secrets=key_material([grant]),
    )
    serves(world)  # tickets under TPK 2 are issued and resolved


def test_forking_ticket_with_a_bad_vr_is_an_auth_failure(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(TEAM,), flags=FORKING))

    def bad_vr(ticket: Ticket) -> Ticket:
        init = ticket.initiator_data
        assert init is not None
        vr = replace(init.vr, mac=flip(init.vr.mac, 0))
        return Ticket(ticket.policy, ticket.ticket_data, replace(init, vr=vr))

    ri = resolve_init(world, grant, BOB, responder=TEAM, change_ticket=bad_vr)
    expect_refusal(
        world,
        lambda: world.resolve(ri),
        Outcome.UNAUTHENTICATED,
        ErrorNo.AUTH_FAILURE,
        csb_id=csb_of(ri),
        signer=signer(BOB, ri),
        reason="Vr",
        secrets=key_material([grant]),
    )
    # The Vr check comes before the J=0 ledger: Bob can still resolve with a genuine Vr.
    keys_b, call_b, _ = world.call(grant, TEAM, resolver=BOB)
    assert keys_b[0].key_and_salt == call_b.srtp[0].key_and_salt
    serves(world)


# --- resources: rate limit, token ---------------------------------------------------------


def test_rate_limit_per_identity(world: World) -> None:
    kms = world.kms
    assert isinstance(kms, Kms)
    world.kms = Kms(replace(kms.deps, rate=TokenBucketRateLimiter(rate=1, burst=2)))
    desired = DesiredPolicy(responders=(BOB,))
    for _ in range(2):  # the burst
        wire, _ = world.initiator().request_ticket(desired, world.now)
        assert world.request(ALICE, wire).ok
    wire, _ = world.initiator().request_ticket(desired, world.now)
    expect_refusal(
        world,
        lambda: world.request(ALICE, wire),
        Outcome.RATE_LIMITED,
        ErrorNo.UNSPECIFIED,
        csb_id=csb_of(wire),
        signer=signer(ALICE, wire),
        reason="rate limit",
    )
    # Other identities are unaffected.
    other, _ = world.initiator(CAROL).request_ticket(desired, world.now)
    assert world.request(CAROL, other).ok
    # The refused message was not put in the replay cache: retried after a refill, it passes.
    world.now += 2
    assert world.request(ALICE, wire).ok
    world.now += 10
    serves(world)


def test_token_unavailable_then_recovered(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(BOB,)))  # the token is in use
    tokens = world.home.path / "token" / "tokens"
    away = world.home.path / "tokens-away"
    desired = DesiredPolicy(responders=(BOB,))
    shutil.move(tokens, away)
    try:
        wire, _ = world.initiator().request_ticket(desired, world.now)
        expect_refusal(
            world,
            lambda: world.request(ALICE, wire),
            Outcome.UNAVAILABLE,
            ErrorNo.UNSPECIFIED,
            csb_id=csb_of(wire),
            reason="token unavailable",
            secrets=key_material([grant]),
        )
        ri = resolve_init(world, grant, BOB)
        expect_refusal(
            world,
            lambda: world.resolve(ri),
            Outcome.UNAVAILABLE,
            ErrorNo.UNSPECIFIED,
            csb_id=csb_of(ri),
            reason="token unavailable",
            secrets=key_material([grant]),
        )
    finally:
        shutil.move(away, tokens)
    # Recovers by itself (reconnects at most once per RECONNECT_INTERVAL).
    deadline = time.monotonic() + 20 * RECONNECT_INTERVAL
    while True:
        wire, _ = world.initiator().request_ticket(desired, world.now)
        reply = world.request(ALICE, wire)
        if reply.ok:
            break
        assert reply.outcome is Outcome.UNAVAILABLE, reply.audit
        assert time.monotonic() < deadline, "KMS did not recover after the token came back"
        time.sleep(RECONNECT_INTERVAL / 5)
    # The RESOLVE_INIT refused while the token was away was not remembered either.
    assert world.resolve(ri).ok
    serves(world)


# --- arbitrary bytes ---------------------------------------------------------------------------


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_arbitrary_bytes_are_refused_and_the_kms_keeps_serving(
    world: World, data: st.DataObject
) -> None:
    # Every example shares this world (and its KMS): state must survive all of them.
    valid, _ = world.initiator().request_ticket(DesiredPolicy(responders=(BOB,)), world.now)
    blob = data.draw(
        st.one_of(
            st.binary(max_size=200),
            st.binary(max_size=200).map(lambda b: valid[:10] + b),  # a real HDR, then noise
            st.integers(0, len(valid) - 1).map(lambda i: flip(valid, i)),
            st.integers(0, len(valid) - 1).map(lambda i: valid[:i]),
        ),
        label="blob",
    )
    to = data.draw(st.sampled_from(["request", "resolve"]), label="to")
    send = world.kms.request_ticket if to == "request" else world.kms.resolve_ticket  # type: ignore[attr-defined]
    before = len(world.audit())
    reply = send(blob, world.now)
    assert reply.outcome not in (Outcome.OK, Outcome.INTERNAL), reply.audit
    assert reply.error_message is not None
    err = Message.decode(reply.error_message)
    assert err.data_type == DataType.ERROR
    compose(err)
    assert len(err.all(Error)) == 1
    assert err.first(Verification) is None  # nothing here is authenticated
    assert len(world.audit()) == before + 1
    assert_no_leak(world, reply, ())
    # The untouched message, sent after its mutants, is accepted.
    assert world.request(ALICE, valid).ok


def test_kms_serves_after_bursts_of_refusals(world: World) -> None:
    """Refusals of every kind, back to back, leave no trace in what the KMS accepts."""
    wire, _ = world.initiator().request_ticket(DesiredPolicy(responders=(BOB,)), world.now)
    for i in range(len(wire)):
        reply = world.request(ALICE, flip(wire, i))
        assert not reply.ok
    for cut in range(len(wire)):
        assert not world.request(ALICE, wire[:cut]).ok
    assert world.request(ALICE, wire).ok
    assert len([r for r in world.audit() if r["outcome"] != "ok"]) == 2 * len(wire)
    serves(world, who=CAROL)
    # An endpoint never takes an error message for a response.
    ini = world.initiator()
    bad, pending = ini.request_ticket(DesiredPolicy(responders=()), world.now)
    err = world.request(ALICE, bad).error_message or b""
    with pytest.raises(EndpointError, match="error message"):
        ini.accept_ticket(pending, err, world.now)
