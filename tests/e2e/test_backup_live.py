"""`kms backup` against a serving KMS: the archive is taken while `kms serve` answers calls,
restored into another folder, and the restored KMS resolves a ticket issued before the
backup (RFC 6043 4.2.3: same TPK, same PSKs, all in the restored token)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from kms.endpoint.client import run_call
from kms.endpoint.initiator import DesiredPolicy
from tests.e2e.harness import ALICE, BOB, PSKS, check_srtp, make_home, run_kms, running_kms


def test_backup_while_serving_restores_a_kms_that_resolves_earlier_tickets(
    tmp_path: Path,
) -> None:
    home = make_home(tmp_path / "home", {ALICE: PSKS[ALICE], BOB: PSKS[BOB]}, {})
    archive = tmp_path / "kms-home.tar.gz"
    with running_kms(home) as k:
        before = k.grant(DesiredPolicy((BOB,)), ALICE)  # issued before the backup
        out = run_kms(home, "backup", "create", str(archive))
        assert "token embedded" in out.stdout
        k.grant(DesiredPolicy((BOB,)), ALICE)  # the server kept serving through it
        # The live state (replay cache) is archived as a snapshot, not the live files.
        with tarfile.open(archive) as tar:
            names = tar.getnames()
            manifest = json.loads(tar.extractfile("MANIFEST.json").read())  # type: ignore[union-attr]
        assert "state/replay.sqlite3" in names
        assert not [n for n in names if n.endswith(("-wal", "-shm", "serve.lock"))], names
        assert set(names) == {"MANIFEST.json", *manifest["files"]}
    restored = tmp_path / "restored"
    run_kms(restored, "backup", "restore", str(archive))
    with running_kms(restored) as k2:
        call = run_call(k2.client(), k2.initiator(ALICE), k2.client(), k2.responder(BOB),
                        grant=before)
        check_srtp(call.initiator.srtp[0], call.responder.srtp[0])
