"""The hot path on PostgreSQL: one database round trip per exchange (the rate-limit bucket
and the replay cache in one statement; registry reads come from the replica's cache), plus
the ledger insert for a single-use (J = 0) ticket's resolve: at most 2. Counted on the real
stores, in process."""

from __future__ import annotations

import time
from pathlib import Path

from hsm.software import SoftwareKeyStore
from kms.core.api import Outcome
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy, Initiator
from kms.endpoint.responder import Responder
from kms.endpoint.session import CryptoSession
from kms.home import open_home
from kms.mikey.ticket import TpFlag
from kms.server.compose import build_handler
from kms.store.pg import PgDatabase
from tests.e2e.harness import ALICE, BOB, KMS_ID, PSKS, make_home, run_kms


def test_database_round_trips_per_exchange(tmp_path: Path, pg_dsn: str) -> None:
    home = make_home(tmp_path / "home", {ALICE: PSKS[ALICE], BOB: PSKS[BOB]}, {})
    run_kms(home, "store", "migrate", pg_dsn)
    h = open_home(home)
    try:
        handler = build_handler(h)
        h.stores.start_background()
        db = getattr(h.stores, "db", None)
        assert isinstance(db, PgDatabase)
        ks = SoftwareKeyStore()
        ini = Initiator(Credentials(ALICE, PSKS[ALICE], KMS_ID), ks)
        bob = Responder(Credentials(BOB, PSKS[BOB], KMS_ID), ks)

        def request(flags: TpFlag) -> object:
            t = time.time()
            wire, pending = ini.request_ticket(DesiredPolicy(responders=(BOB,), flags=flags), t)
            reply = handler.request_ticket(wire, t)
            assert reply.outcome is Outcome.OK, reply
            return ini.accept_ticket(pending, reply.data, t)

        def resolve(g: object) -> None:
            t = time.time()
            ti, _ = ini.transfer_init(g, t, BOB, [CryptoSession(1, 5)])  # type: ignore[arg-type]
            wire, _ = bob.receive_transfer_init(ti, t)
            assert handler.resolve_ticket(wire, t).outcome is Outcome.OK

        resolve(request(DEFAULT_FLAGS))  # the registry cache fills on first use
        for flags, resolve_rt in ((DEFAULT_FLAGS | TpFlag.J, 1), (DEFAULT_FLAGS, 2)):
            n = 10
            grants = []
            before = db.round_trips
            for _ in range(n):
                grants.append(request(flags))
            assert (db.round_trips - before) / n == 1
            before = db.round_trips
            for g in grants:
                resolve(g)
            assert (db.round_trips - before) / n == resolve_rt
    finally:
        h.close()
