"""Every call ends with exactly one audit record and an outcome of the documented table, also
when a store behind a port fails or a lookup error escapes the handlers: the registry gone
or unreadable (UNAVAILABLE), no current TPK (INTERNAL), each with a MIKEY error message."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable

import pytest

from kms.core.api import KmsReply, Outcome
from kms.endpoint.initiator import DesiredPolicy
from kms.endpoint.session import CryptoSession
from kms.mikey.constants import DataType, ErrorNo
from kms.mikey.message import Message
from kms.mikey.payloads import Error
from kms.store.registry import REGISTRY_FILE
from tests.server.world import ALICE, BOB, World


def in_new_thread(fn: Callable[[], KmsReply]) -> KmsReply:
    """Run a core call in a fresh thread: the registry adapter opens its per-thread
    connection there, as a new gRPC worker thread would."""
    out: list[KmsReply] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # the defect: an exception escaping the core
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not errors, f"escaped the core: {errors[0]!r}"
    return out[0]


def one_refusal(world: World, before: int, reply: KmsReply, outcome: Outcome) -> dict[str, object]:
    assert reply.outcome is outcome, reply.audit
    assert reply.error_message is not None
    err = Message.decode(reply.error_message)
    assert err.data_type == DataType.ERROR
    assert err.one(Error).error_no == ErrorNo.UNSPECIFIED
    records = world.audit()[before:]
    assert len(records) == 1, records
    assert records[0]["event"] == "refused" and records[0]["outcome"] == outcome.value
    return records[0]


def test_registry_gone_is_unavailable_and_audited(world: World) -> None:
    wire, _ = world.initiator().request_ticket(DesiredPolicy((BOB,), lifetime_s=600), world.now)
    (world.home.path / REGISTRY_FILE).unlink()
    before = len(world.audit())
    reply = in_new_thread(lambda: world.request(ALICE, wire))
    record = one_refusal(world, before, reply, Outcome.UNAVAILABLE)
    assert record["reason"] == "registry: RegistryUnavailable"
    assert reply.detail == "KMS store unavailable"


def test_registry_unreadable_is_unavailable_and_audited(world: World) -> None:
    grant = world.grant(DesiredPolicy((BOB,), lifetime_s=600))
    ti, _ = world.initiator().transfer_init(grant, world.now, BOB, (CryptoSession(1, 7),))
    ri, _ = world.responder(BOB).receive_transfer_init(ti, world.now)
    (world.home.path / REGISTRY_FILE).write_bytes(b"not a database" * 512)
    for suffix in ("-wal", "-shm"):
        (world.home.path / (REGISTRY_FILE + suffix)).unlink(missing_ok=True)
    before = len(world.audit())
    reply = in_new_thread(lambda: world.resolve(ri))
    record = one_refusal(world, before, reply, Outcome.UNAVAILABLE)
    assert str(record["reason"]).startswith("registry: ")


def test_lookup_error_escaping_a_handler_is_internal_and_audited(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    # No current TPK (a damaged registry): the directory raises LookupError from the handler.
    conn = sqlite3.connect(world.home.path / REGISTRY_FILE)
    with conn:
        conn.execute("UPDATE tpk_versions SET state = 'active'")
    conn.close()
    wire, _ = world.initiator().request_ticket(DesiredPolicy((BOB,), lifetime_s=600), world.now)
    before = len(world.audit())
    with caplog.at_level(logging.ERROR, logger="kms.core"):
        reply = in_new_thread(lambda: world.request(ALICE, wire))
    # Logged by type and place only: an exception's text may quote the request.
    logged = [r for r in caplog.records if r.name == "kms.core"]
    assert [r.getMessage().split(" (")[0] for r in logged] == ["unexpected LookupError"]
    assert logged[0].exc_info is None and "run `kms init`" not in caplog.text
    record = one_refusal(world, before, reply, Outcome.INTERNAL)
    assert record["reason"] == "unexpected LookupError"
    assert reply.detail == "internal error"
    # The sender was authenticated: the error message is not signed (internal errors never
    # touch the token again), but it names the request's CSB.
    assert (
        Message.decode(reply.error_message or b"").header.csb_id
        == Message.decode(wire).header.csb_id
    )
