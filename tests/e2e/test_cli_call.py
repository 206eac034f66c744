"""`kms call` against a running `kms serve`: the granted policy and key identifiers are
shown, key values never; refusals are one line with the gRPC status and the MIKEY error."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from typing import Any

import pytest

from kms.endpoint.client import obtain_ticket
from kms.endpoint.initiator import DesiredPolicy
from tests.e2e.harness import BOB, CAROL, ERIN, KMS_ID, MALLORY, PSKS, REPO, TEAM, Kms


def kms_call(kms: Kms, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kms.cli", "--home", str(kms.home), "call",
         "--target", kms.target, *args],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip


def assert_one_line_error(proc: subprocess.CompletedProcess[str], pattern: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kms: error: ")
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def assert_no_secrets(text: str, *secrets: bytes) -> None:
    low = text.lower()
    for s in secrets:
        assert s.hex() not in low
        assert s.hex()[:16] not in low  # not even a prefix


def test_kms_call_prints_the_policy_and_no_keys(kms: Kms) -> None:
    psk = PSKS[ERIN]
    proc = kms_call(kms, "--identity", ERIN.decode(), "--psk-hex", psk.hex(),
                    "--to", BOB.decode(), "--lifetime", "600")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"ticket granted by {kms.target}" in out
    assert re.search(r"ticket id:\s+[0-9a-f]{32}\n", out)
    assert re.search(rf"initiator:\s+{re.escape(ERIN.decode())}\n", out)
    assert re.search(rf"responders:\s+{re.escape(BOB.decode())}\n", out)
    assert re.search(r"flags:\s+DEFGHNO\n", out), out
    # No TRs asked (no lower bound, RFC 6043 6.10), none granted; the TRe asked for is kept.
    assert re.search(r"valid:\s+any time \.\. \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n", out)
    assert re.search(r"key:\s+TGK 128 bits spi [0-9a-f]{8}\n", out)
    assert_no_secrets(out + proc.stderr, psk)
    # The KMS id came from kms.toml in --home.
    assert re.search(rf"kms:\s+{re.escape(KMS_ID.decode())}\n", out)


def test_kms_call_resolve_as_shows_agreement_by_fingerprint_only(kms: Kms) -> None:
    proc = kms_call(kms, "--identity", ERIN.decode(), "--psk-hex", PSKS[ERIN].hex(),
                    "--to", TEAM.decode(), "--forking", "--resolve-as", CAROL.decode(),
                    "--resolve-psk-hex", PSKS[CAROL].hex(), "--json",
                    "--kms-id", KMS_ID.decode())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    t, call = report["ticket"], report["call"]
    assert t["forking"] and "I" in t["flags"] and t["responders"] == [TEAM.decode()]
    assert [k["type"] for k in t["keys"]] == ["TGK"] and len(t["keys"][0]["spi"]) == 8
    assert call["keys_agree"] is True
    assert call["initiator_fingerprint"] == call["responder_fingerprint"]
    assert call["transferred_to"] == TEAM.decode() and call["resolved_by"] == CAROL.decode()
    assert_no_secrets(proc.stdout + proc.stderr, PSKS[ERIN], PSKS[CAROL])

    # No key values: get a grant of our own and check that what kms call prints for one
    # ticket has the shape of identifiers only (32-hex ticket id = SHA-256 of Ticket Data,
    # as in the audit log).
    grant = obtain_ticket(kms.client(), kms.initiator(ERIN), DesiredPolicy(responders=(BOB,)))
    proc = kms_call(kms, "--identity", ERIN.decode(), "--psk-hex", PSKS[ERIN].hex(),
                    "--to", BOB.decode(), "--resolve-as", BOB.decode(),
                    "--resolve-psk-hex", PSKS[BOB].hex())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "both ends agree on the SRTP keys" in proc.stdout
    for k in (grant.mpki, *(s.key for s in grant.session_keys)):
        assert_no_secrets(proc.stdout, k)
    assert hashlib.sha256(grant.ticket.ticket_data).hexdigest() not in proc.stdout  # new ticket
    fp = re.search(r"fingerprint: initiator ([0-9a-f]{16}) responder ([0-9a-f]{16})", proc.stdout)
    assert fp and fp.group(1) == fp.group(2)


def test_kms_call_output_has_no_key_of_the_call_it_made(
    kms: Kms, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kms call` run in-process so that the test can see the keys of the very call it made
    (MPKs, TGK, SRTP master keys and salts) and check that none of them is printed."""
    from kms.cli import main
    from kms.endpoint import client as client_mod

    seen: list[Any] = []

    def spy(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            seen.append(result)
            return result

        return wrapper

    monkeypatch.setattr(client_mod, "obtain_ticket", spy(client_mod.obtain_ticket))
    monkeypatch.setattr(client_mod, "run_call", spy(client_mod.run_call))
    for extra in ([], ["--json"]):
        seen.clear()
        argv = [
            *("--home", str(kms.home), "call", "--target", kms.target),
            *("--identity", ERIN.decode(), "--psk-hex", PSKS[ERIN].hex(), "--to", BOB.decode()),
            *("--resolve-as", BOB.decode(), "--resolve-psk-hex", PSKS[BOB].hex(), *extra),
        ]
        assert main(argv) == 0
        out, err = capsys.readouterr()
        grant, call = seen
        keys = [grant.mpki, *(k.key for k in grant.session_keys)]
        for state in (call.initiator, call.responder):
            keys += [k.master_key for k in state.srtp] + [k.master_salt for k in state.srtp]
        keys += [k.key for k in call.responder.session_keys]
        assert len(keys) >= 7
        assert_no_secrets(out + err, PSKS[ERIN], PSKS[BOB], *keys)
        assert hashlib.sha256(grant.ticket.ticket_data).hexdigest()[:32] in out  # the ticket id


def test_kms_call_refusals_are_one_line_with_status_and_mikey_error(kms: Kms) -> None:
    # Wrong PSK: UNAUTHENTICATED, MIKEY error 0.
    proc = kms_call(kms, "--identity", ERIN.decode(), "--psk-hex", "00" * 16,
                    "--to", BOB.decode())  # fmt: skip
    line = assert_one_line_error(
        proc, r"RequestTicket refused by .*: UNAUTHENTICATED: authentication failed "
        r"\(MIKEY error 0 AUTH_FAILURE\)"
    )  # fmt: skip
    assert "00" * 16 not in line
    # Mallory resolving a ticket for Bob: PERMISSION_DENIED at ResolveTicket.
    proc = kms_call(kms, "--identity", ERIN.decode(), "--psk-hex", PSKS[ERIN].hex(),
                    "--to", BOB.decode(), "--resolve-as", MALLORY.decode(),
                    "--resolve-psk-hex", PSKS[MALLORY].hex())  # fmt: skip
    assert_one_line_error(
        proc, r"ResolveTicket refused by .*: PERMISSION_DENIED: .*\(MIKEY error 7 INVALID_ID\)"
    )
    assert_no_secrets(proc.stderr, PSKS[ERIN], PSKS[MALLORY])
    # Another KMS id: PERMISSION_DENIED.
    proc = kms_call(kms, "--identity", ERIN.decode(), "--psk-hex", PSKS[ERIN].hex(),
                    "--to", BOB.decode(), "--kms-id", "kms:other.example")  # fmt: skip
    assert_one_line_error(proc, r"PERMISSION_DENIED: .*\(MIKEY error 7 INVALID_ID\)")
    # Nobody listening: UNAVAILABLE without a MIKEY error.
    proc = subprocess.run(
        [sys.executable, "-m", "kms.cli", "call", "--target", "127.0.0.1:1", "--timeout", "3",
         "--identity", ERIN.decode(), "--psk-hex", PSKS[ERIN].hex(), "--to", BOB.decode(),
         "--kms-id", KMS_ID.decode()],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    line = assert_one_line_error(proc, r"refused by 127\.0\.0\.1:1: UNAVAILABLE")
    assert "MIKEY error" not in line
    # Bad input is refused before any call, without echoing the PSK.
    proc = kms_call(kms, "--identity", ERIN.decode(), "--psk-hex", "zz" + "ab" * 16,
                    "--to", BOB.decode())  # fmt: skip
    assert_one_line_error(proc, r"--psk-hex: PSK is not valid hexadecimal$")
