"""The core as steps (kms.core.steps): a PK message yields exactly one token operation (the
PKE's RSA decryption, RFC 3830 4.2.5), a PSK message none; driving the steps gives the same
bytes as the one-call methods, and an operation's exception is refused as it is inline.

A small PKI made here (a root CA, Alice's certificate with her identity as subjectAltName
URI, the KMS's envelope certificate) on the software key store: no token."""

from __future__ import annotations

import datetime as dt
import functools
import random
from collections.abc import Generator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_der_public_key
from cryptography.x509.oid import NameOID

from kms.core.api import KmsReply, Outcome
from kms.core.federation import PeerCall
from kms.core.pk import CertificateAuthenticator, EnvelopeKey
from kms.core.policy import KmsPolicy
from kms.core.ports import PeerKms
from kms.core.steps import CallCancelled, TokenIo, cancel, drive, token
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.endpoint.pk import PkCredentials, PkInitiator
from kms.keystore import InvalidSealedData, KeyRef, TokenUnavailable
from kms.mikey.constants import ErrorNo, IdType
from kms.mikey.message import Message
from kms.mikey.payloads import Error
from kms.store.memory import MemoryReplayCache
from tests.core.world import ALICE, BOB, KMS_ID, PSKS, World, make_world

ENVELOPE = "kms/envelope"
DAY = dt.timedelta(days=1)


@functools.cache
def _key(name: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(subject: str, public: rsa.RSAPublicKey, issuer: str, signer: rsa.RSAPrivateKey,
          *, ca: bool, uri: bytes | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    usage = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment",
                           "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
                           "encipher_only", "decipher_only"), False)
    usage["key_cert_sign" if ca else "digital_signature"] = True
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    if uri is not None:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri.decode())]),
            critical=False,
        ).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    return b.sign(signer, hashes.SHA256())


class PkCore:
    """A core world with ``[pk]`` on: the envelope key in the software key store, Alice's
    credentials, and the key store's randomness replayable (``seed``)."""

    def __init__(self) -> None:
        self.world: World = make_world()
        deps = self.world.kms.deps
        root_key = _key("root")
        root = _cert("Test Root", root_key.public_key(), "Test Root", root_key, ca=True)
        deps.keystore.generate_rsa(ENVELOPE, 2048)  # type: ignore[attr-defined]
        env_public = load_der_public_key(deps.keystore.public_key_der(KeyRef(ENVELOPE)))
        assert isinstance(env_public, rsa.RSAPublicKey)
        env_cert = _cert("KMS", env_public, "Test Root", root_key, ca=False, uri=KMS_ID)
        self.kms_cert_der = env_cert.public_bytes(Encoding.DER)
        deps.pk = CertificateAuthenticator(
            deps, [root], [EnvelopeKey(KeyRef(ENVELOPE), self.kms_cert_der)]
        )
        alice_key = _key("alice")
        leaf = _cert("alice", alice_key.public_key(), "Test Root", root_key, ca=False,
                     uri=ALICE)
        self.creds = PkCredentials(
            ALICE, (leaf.public_bytes(Encoding.DER),), alice_key, KMS_ID, self.kms_cert_der
        )
        self._rng = random.Random(0)
        deps.keystore.random = self._random  # type: ignore[attr-defined]

    def _random(self, length: int) -> bytes:
        return self._rng.randbytes(length)

    def fresh(self) -> None:
        """The same randomness and an empty replay cache, so that one message can be
        handled twice and answered with the same bytes."""
        self._rng = random.Random(7)
        self.world.kms.deps.replay = MemoryReplayCache()

    def pk_request(self) -> bytes:
        ini = PkInitiator(self.creds, self.world.sw)
        wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), self.world.now)
        return wire


@pytest.fixture(scope="module")
def pk_core() -> PkCore:
    return PkCore()


def _drive_counting(steps: Generator[TokenIo[Any], object, Any]) -> tuple[Any, list[str]]:
    """Drive ``steps`` as a server would (each operation called, its result sent back),
    noting what each yielded operation was."""
    seen: list[str] = []
    try:
        io = next(steps)
        while True:
            assert isinstance(io, TokenIo)
            seen.append(io.fn.__name__)
            io = steps.send(io())
    except StopIteration as done:
        return done.value, seen


def test_a_pk_request_yields_its_rsa_decryption_once_and_answers_the_same(
    pk_core: PkCore,
) -> None:
    wire = pk_core.pk_request()
    kms, now = pk_core.world.kms, pk_core.world.now
    pk_core.fresh()
    inline = kms.request_ticket(wire, now, correlation_id="c1")
    assert inline.ok, inline.audit
    pk_core.fresh()
    stepped, seen = _drive_counting(kms.request_steps(wire, now, correlation_id="c1"))
    assert seen == ["rsa_decrypt"]
    assert isinstance(stepped, KmsReply) and stepped.ok
    assert stepped.data == inline.data  # byte for byte
    assert stepped.audit == inline.audit


def test_a_psk_request_and_resolve_yield_nothing(pk_core: PkCore) -> None:
    world = pk_core.world
    ini = world.initiator(ALICE)
    wire, pending = ini.request_ticket(DesiredPolicy(responders=(BOB,)), world.now)
    pk_core.fresh()
    inline = world.kms.request_ticket(wire, world.now)
    pk_core.fresh()
    stepped, seen = _drive_counting(world.kms.request_steps(wire, world.now))
    assert seen == []
    assert stepped.ok and stepped.data == inline.data
    grant = ini.accept_ticket(pending, stepped.data, world.now)
    ti, _ = ini.transfer_init(grant, world.now, BOB, ())
    res = world.responder(BOB)
    ri, _ = res.receive_transfer_init(ti, world.now)
    first, seen = _drive_counting(world.kms.resolve_first_steps(ri, world.now))
    assert seen == []
    assert isinstance(first, KmsReply) and first.ok, first


def test_an_undecryptable_pke_is_refused_as_inline(pk_core: PkCore) -> None:
    wire = pk_core.pk_request()
    msg = Message.decode(wire)
    pk_core.fresh()
    # The operation's exception travels back as a value and is raised at the yield point.
    steps = pk_core.world.kms.request_steps(wire, pk_core.world.now)
    io = next(steps)
    assert isinstance(io, TokenIo)
    with pytest.raises(StopIteration) as done:
        steps.send(InvalidSealedData("no"))
    reply = done.value.value
    assert reply.outcome is Outcome.UNAUTHENTICATED and reply.detail == "authentication failed"
    assert reply.audit["reason"] == "PKE cannot be decrypted"
    err = Message.decode(reply.error_message)
    assert err.header.csb_id == msg.header.csb_id
    assert [e.error_no for e in err.all(Error)] == [ErrorNo.AUTH_FAILURE]


def test_a_token_gone_during_the_rsa_operation_is_unavailable(pk_core: PkCore) -> None:
    wire = pk_core.pk_request()
    pk_core.fresh()
    steps = pk_core.world.kms.request_steps(wire, pk_core.world.now)
    assert isinstance(next(steps), TokenIo)
    with pytest.raises(StopIteration) as done:
        steps.send(TokenUnavailable("token gone"))
    reply = done.value.value
    assert reply.outcome is Outcome.UNAVAILABLE
    assert reply.detail == "token unavailable"


def test_token_io_returns_what_the_operation_raised() -> None:
    def fails() -> bytes:
        raise TokenUnavailable("gone")

    io = TokenIo(fails)
    result = io()
    assert isinstance(result, TokenUnavailable)
    assert "gone" not in repr(io) and repr(io) == "TokenIo(fails)"

    def steps() -> Generator[TokenIo[Any], object, str]:
        value = yield from token(lambda n: b"x" * n, 3)
        try:
            yield from token(fails)
        except TokenUnavailable:
            return f"{value!r} then unavailable"
        return "not reached"

    assert drive(steps()) == "b'xxx' then unavailable"


# --- a call cancelled while its steps wait (kms.core.steps.cancel) ---------------------------


def test_a_pk_request_cancelled_at_its_rsa_step_has_one_cancelled_record(
    pk_core: PkCore,
) -> None:
    wire = pk_core.pk_request()
    pk_core.fresh()
    sink = pk_core.world.sink
    before = len(sink.records)
    steps = pk_core.world.kms.request_steps(wire, pk_core.world.now, correlation_id="c-cancel")
    assert isinstance(next(steps), TokenIo)  # waiting for the PKE's RSA decryption
    reply = cancel(steps)
    assert reply.outcome is Outcome.CANCELLED and not reply.ok
    assert reply.data == b"" and reply.error_message is None  # nobody to send one to
    [record] = sink.records[before:]
    assert record["outcome"] == "cancelled" and record["event"] == "refused"
    assert record["reason"] == "cancelled while waiting for the token"
    assert record["sender"] == ALICE.decode()  # its signature had verified
    assert record["correlation_id"] == "c-cancel"
    assert record["data_type"] == "REQUEST_INIT_PK"
    assert "error_no" not in record and "ticket_id" not in record
    # Nothing was admitted either: the same message is still answered (no replay).
    again = drive(pk_core.world.kms.request_steps(wire, pk_core.world.now))
    assert again.ok, again.audit
    assert [r["outcome"] for r in sink.records[before:]] == ["cancelled", "ok"]


def test_steps_that_returned_cannot_be_cancelled(pk_core: PkCore) -> None:
    """The ticket is issued after the last yield, on the same run of the steps: once
    issued (and its "ok" record written) there is no yield left to cancel at."""
    wire = pk_core.pk_request()
    pk_core.fresh()
    sink = pk_core.world.sink
    before = len(sink.records)
    steps = pk_core.world.kms.request_steps(wire, pk_core.world.now)
    io = next(steps)
    assert isinstance(io, TokenIo)
    with pytest.raises(StopIteration) as done:
        steps.send(io())
    assert done.value.value.ok
    with pytest.raises(CallCancelled):
        cancel(steps)
    assert [r["outcome"] for r in sink.records[before:]] == ["ok"]  # never also "cancelled"


def test_steps_that_go_on_after_a_cancel_are_closed() -> None:
    closed: list[bool] = []

    def stubborn() -> Generator[str, object, str]:
        try:
            try:
                yield "first"
            except CallCancelled:
                yield "again"
            return "no"
        finally:
            closed.append(True)

    steps = stubborn()
    next(steps)
    with pytest.raises(RuntimeError, match="after their call was cancelled"):
        cancel(steps)
    assert closed == [True]


def test_a_cancel_passes_every_except_exception_of_the_core() -> None:
    """CallCancelled is no Exception: a step's error handling cannot turn it into a
    refusal of the message."""
    def guarded() -> Generator[TokenIo[Any], object, str]:
        try:
            yield from token(lambda: b"x")
        except Exception:
            return "refused"
        return "done"

    steps = guarded()
    next(steps)
    with pytest.raises(CallCancelled):
        cancel(steps)
    assert not issubclass(CallCancelled, Exception)


OTHER_KMS = b"kms:other.example"


def test_a_federated_resolve_cancelled_while_the_peer_has_not_answered() -> None:
    """RFC 6043 9: Bob resolves, at our KMS, a ticket another KMS issued; the core returns
    the peer call; the call is cancelled before the peer answers: one record, CANCELLED,
    with Bob, the peer and the ticket's issuer, and nothing issued."""
    world = make_world()
    world.kms.deps.federation = True
    world.directory.keystore.import_secret("peer/other", bytes.fromhex("ab" * 32))
    world.directory.peers[OTHER_KMS] = PeerKms(OTHER_KMS, KeyRef("peer/other"))
    other = make_world(KmsPolicy(kms_id=OTHER_KMS))
    ini = Initiator(Credentials(ALICE, PSKS[ALICE], OTHER_KMS, IdType.URI), other.sw)
    wire, pending = ini.request_ticket(DesiredPolicy(responders=(BOB,)), other.now)
    issued = other.kms.request_ticket(wire, other.now)
    assert issued.ok, issued.audit
    grant = ini.accept_ticket(pending, issued.data, other.now)
    ti, _ = ini.transfer_init(grant, world.now, BOB, ())
    ri, _ = world.responder(BOB).receive_transfer_init(ti, world.now)
    call = drive(world.kms.resolve_first_steps(ri, world.now, correlation_id="f-cancel"))
    assert isinstance(call, PeerCall)
    assert world.sink.records == []  # audited when it finishes
    reply = world.kms.cancel_resolve(call)
    assert reply.outcome is Outcome.CANCELLED and reply.data == b""
    [record] = world.sink.records
    assert record["outcome"] == "cancelled"
    assert record["reason"] == "cancelled while waiting for peer KMS kms:other.example"
    assert record["sender"] == BOB.decode() and record["peer"] == OTHER_KMS.decode()
    assert record["correlation_id"] == "f-cancel"
    assert record["event"] == "ticket.forwarded"  # as a forwarded resolve's failure says
