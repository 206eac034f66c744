"""Whole gRPC exchanges on each PKCS#11 module: `kms init` on SoftHSM2 (embedded) and on
openCryptoki's soft token (named by a PKCS#11 URI, RFC 7512), `kms serve` with two worker
processes, then PSK calls with both MIKEY suites, forking to a group, and a public-key
request and resolve with forking (RFC 6043 4.2.1.1, 4.2.3.1, 5.1.1), over real gRPC and SRTP.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hsm import open_keystore
from hsm.uri import token_uri
from kms.endpoint.client import KmsRefused, obtain_ticket, resolve, run_call
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.endpoint.pk import PkCredentials, PkInitiator, PkResponder
from kms.endpoint.session import CryptoSession
from kms.mikey.prf import PrfFunc
from kms.mikey.protect import SUITE_256
from kms.mikey.ticket import TpFlag
from tests.e2e.harness import (
    ALICE,
    BOB,
    CAROL,
    KMS_ID,
    MALLORY,
    PSKS,
    TEAM,
    Kms,
    check_srtp,
    run_kms,
    running_kms,
    srtp_refuses,
)
from tests.pki import Pki, make_pki, pem
from tests.token_modules import MODULES, OckToken

FORKING = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki(dt.datetime.now(dt.UTC).replace(microsecond=0))


def _wipe(ock: OckToken) -> None:
    """The openCryptoki token is shared by the session: leave it without this home's keys."""
    with open_keystore(ock.config()) as ks:
        for info in ks.list_keys():
            ks.delete(info.label)


@pytest.fixture(scope="module", params=MODULES)
def module_kms(request: pytest.FixtureRequest, pki: Pki,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Kms]]:
    base = tmp_path_factory.mktemp(f"e2e-{request.param}")
    home = base / "home"
    ock: OckToken | None = None
    if request.param == "softhsm2":
        run_kms(home, "init", "--kms-id", KMS_ID.decode())
    else:
        ock = request.getfixturevalue("ock_token")
        pin = base / "pin"
        pin.write_text(ock.user_pin + "\n")
        pin.chmod(0o600)
        uri = token_uri(ock.label, module=ock.module, pin_file=str(pin))
        run_kms(home, "init", "--kms-id", KMS_ID.decode(), "--token-uri", uri)
        assert f'uri = "{uri}"' in (home / "kms.toml").read_text()
    try:
        for ident in (ALICE, BOB, CAROL, MALLORY):
            run_kms(home, "endpoint", "add", ident.decode(), "--psk-hex", PSKS[ident].hex())
        run_kms(home, "group", "add", TEAM.decode(), BOB.decode(), CAROL.decode())
        # [pk] on: endpoint certificates chain to this CA (as tests/server/test_pk.py does).
        (home / "endpoint-ca.pem").write_bytes(pem(pki.root.cert))
        toml = home / "kms.toml"
        toml.write_text(toml.read_text().replace("# ca_bundle = ", "ca_bundle = ", 1))
        with running_kms(home, "--workers", "2") as k:
            yield request.param, k
    finally:
        if ock is not None:
            _wipe(ock)


def _kms_cert_der(home: Path) -> bytes:
    cert = x509.load_pem_x509_certificate((home / "kms-cert.pem").read_bytes())
    return cert.public_bytes(Encoding.DER)


def test_psk_calls_with_both_suites(module_kms: tuple[str, Kms]) -> None:
    name, kms = module_kms
    for suite, prf in ((None, PrfFunc.MIKEY_1), (SUITE_256, PrfFunc.PRF_HMAC_SHA_256)):
        ini = Initiator(kms.creds(ALICE), kms.ks) if suite is None else \
            Initiator(kms.creds(ALICE), kms.ks, suite)
        sessions = (CryptoSession(1, 0x5EC0001),)
        call = run_call(kms.client(), ini, kms.client(), kms.responder(BOB),
                        desired=DesiredPolicy(responders=(BOB,), prf_func=prf),
                        sessions=sessions)  # fmt: skip
        assert call.grant.policy.prf_func == prf, name
        packets = check_srtp(call.initiator.srtp[0], call.responder.srtp[0])
        assert srtp_refuses(packets, call.responder.srtp[0], key=os.urandom(30))
    # Mallory is registered but not named: refused on this module too.
    grant = obtain_ticket(kms.client(), kms.initiator(ALICE), DesiredPolicy(responders=(BOB,)))
    ti, _ = kms.initiator(ALICE).transfer_init(grant, time.time(), BOB,
                                               (CryptoSession(1, 7),))
    with pytest.raises(KmsRefused):
        resolve(kms.client(), kms.responder(MALLORY), ti)


def test_psk_forking_to_a_group(module_kms: tuple[str, Kms]) -> None:
    _name, kms = module_kms
    ini = kms.initiator(ALICE)
    grant = obtain_ticket(kms.client(), ini, DesiredPolicy(responders=(TEAM,), flags=FORKING))
    assert grant.policy.flags & TpFlag.I and grant.mpkr is not None
    sessions = (CryptoSession(1, 0x7EA40001),)
    bob = run_call(kms.client(), ini, kms.client(), kms.responder(BOB),
                   grant=grant, to=TEAM, sessions=sessions)  # fmt: skip
    carol = run_call(kms.client(), ini, kms.client(), kms.responder(CAROL),
                     grant=grant, to=TEAM, sessions=sessions)  # fmt: skip
    check_srtp(bob.initiator.srtp[0], bob.responder.srtp[0])
    check_srtp(carol.initiator.srtp[0], carol.responder.srtp[0])
    # Forked keys (RFC 6043 5.1.1): the two members do not share SRTP keys.
    assert bob.initiator.srtp[0].key_and_salt != carol.initiator.srtp[0].key_and_salt


def test_pk_request_and_pk_resolve_with_forking(module_kms: tuple[str, Kms], pki: Pki) -> None:
    _name, kms = module_kms
    kms_cert = _kms_cert_der(kms.home)

    def creds(who: bytes) -> PkCredentials:
        key, chain = pki.chain(who)
        return PkCredentials(who, chain, key, KMS_ID, kms_cert)

    ini = PkInitiator(creds(ALICE), kms.ks)
    grant = obtain_ticket(kms.client(), ini, DesiredPolicy(responders=(TEAM,), flags=FORKING))
    assert grant.policy.flags & TpFlag.I
    now = time.time()
    sessions = (CryptoSession(1, 0x0A0B0C0D),)
    ti, pending = ini.transfer_init(grant, now, TEAM, sessions)
    # The envelope key is unsealed and the reply signed inside each module's token.
    call = resolve(kms.client(), PkResponder(creds(BOB), kms.ks), ti)
    assert call.initiator == ALICE and call.transfer_resp is not None
    keys_a = ini.accept_transfer_resp(pending, call.transfer_resp, time.time())
    assert [k.key_and_salt for k in keys_a] == [k.key_and_salt for k in call.srtp]
    assert call.session_keys[0].key != grant.session_keys[0].key  # forked to Bob
    check_srtp(keys_a[0], call.srtp[0])
