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
from kms.core.pk import CertificateAuthenticator, EnvelopeKey
from kms.core.steps import TokenIo, drive, token
from kms.endpoint.initiator import DesiredPolicy
from kms.endpoint.pk import PkCredentials, PkInitiator
from kms.keystore import InvalidSealedData, KeyRef, TokenUnavailable
from kms.mikey.constants import ErrorNo
from kms.mikey.message import Message
from kms.mikey.payloads import Error
from kms.store.memory import MemoryReplayCache
from tests.core.world import ALICE, BOB, KMS_ID, World, make_world

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
