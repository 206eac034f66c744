"""Whole MIKEY-TICKET exchanges over gRPC against a real `kms serve` (two worker processes,
each with its own token login): the endpoint library on one side, the KMS core on the
other, only bytes in between."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from hsm.software import SoftwareKeyStore
from kms import rpc
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.endpoint.responder import Responder
from kms.endpoint.session import CryptoSession
from kms.mikey.constants import IdType
from kms.server.home import open_home

ALICE = b"sip:alice@example.org"
BOB = b"sip:bob@example.org"
PSKS = {ALICE: bytes.fromhex("a1" * 16), BOB: bytes.fromhex("b0b0" * 8)}


def _register(home: Path) -> bytes:
    h = open_home(home)
    try:
        for ident, psk in PSKS.items():
            h.add_endpoint(ident, IdType.URI, psk)
        return h.config.kms_id_bytes
    finally:
        h.close()


def _exchange(target: str, kms_id: bytes) -> tuple[bytes, bytes]:
    """Ticket request by Alice, transfer to Bob, resolve by Bob; -> (Alice's TGK-derived
    SRTP master key, Bob's) for the one crypto session."""
    sw = SoftwareKeyStore()
    alice = Initiator(Credentials(ALICE, PSKS[ALICE], kms_id), sw)
    bob = Responder(Credentials(BOB, PSKS[BOB], kms_id), sw)
    now = time.time()
    with grpc.insecure_channel(target) as channel:
        kms = rpc.client_stub(channel)
        wire, pending = alice.request_ticket(DesiredPolicy(responders=(BOB,)), now)
        grant = alice.accept_ticket(
            pending, kms.RequestTicket(rpc.MikeyMessage(data=wire), timeout=10).data, now
        )
        ti, pt = alice.transfer_init(grant, now, BOB, (CryptoSession(1, 0x11223344),))
        ri, pr = bob.receive_transfer_init(ti, now)
        resolved = kms.ResolveTicket(rpc.MikeyMessage(data=ri), timeout=10).data
        call = bob.accept_resolve(pr, resolved, now)
    assert call.transfer_resp is not None
    alice_keys = alice.accept_transfer_resp(pt, call.transfer_resp, now)
    return alice_keys[0].master_key, call.srtp[0].master_key


def test_concurrent_exchanges_over_two_workers_and_replay(
    serve_home: Path, serve_proc: Any, free_port: Any
) -> None:
    kms_id = _register(serve_home)
    target = f"127.0.0.1:{free_port()}"
    p = serve_proc(serve_home, "--listen", target, "--workers", "2")
    p.wait_ready()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _i: _exchange(target, kms_id), range(16)))
    for alice_key, bob_key in results:
        assert alice_key == bob_key
    assert len({a for a, _ in results}) == 16  # a fresh key per call

    # A replayed REQUEST_INIT is refused whichever worker gets it (shared replay state);
    # the RFC 6043 error message comes back in mikey-error-bin.
    sw = SoftwareKeyStore()
    alice = Initiator(Credentials(ALICE, PSKS[ALICE], kms_id), sw)
    wire, _ = alice.request_ticket(DesiredPolicy(responders=(BOB,)), time.time())
    codes = []
    for _ in range(4):
        with grpc.insecure_channel(target) as channel:  # new connection each time
            try:
                rpc.client_stub(channel).RequestTicket(rpc.MikeyMessage(data=wire), timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                e: Any = err
                codes.append(e.code())
                assert dict(e.trailing_metadata()).get("mikey-error-bin"), e.details()
    assert codes[0] is grpc.StatusCode.OK
    assert all(c is not grpc.StatusCode.OK for c in codes[1:]), codes
    assert p.terminate() == 0, p.stderr
