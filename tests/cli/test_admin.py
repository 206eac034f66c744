"""The operator CLI as a user runs it (subprocess, real SoftHSM2 token in the home).

After every failing command the test checks that nothing was half-written: registry rows,
token objects (`kms keys list`), `kms endpoint list` and the home's files are unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kms.cli import build_parser

KMS_ID = "kms:kms.example.org"
ALICE = "sip:alice@example.org"
BOB = "sip:bob@example.org"
PSK_HEX = "00112233445566778899aabbccddeeff"
PSK32_HEX = "a5" * 32

Run = Callable[..., Any]


def _keys(kms: Run, home: Path) -> dict[str, dict[str, Any]]:
    return {k["label"]: k for k in json.loads(kms(home, "keys", "list", "--json").stdout)}


def _endpoints(kms: Run, home: Path) -> dict[str, dict[str, Any]]:
    return {e["identity"]: e for e in json.loads(kms(home, "endpoint", "list", "--json").stdout)}


# --- help ------------------------------------------------------------------------------------

COMMANDS = [
    ["init"], ["endpoint"], ["endpoint", "add"], ["endpoint", "remove"], ["endpoint", "list"],
    ["group"], ["group", "add"], ["group", "remove"], ["group", "list"],
    ["keys"], ["keys", "list"], ["keys", "delete-orphan"],
    ["tpk"], ["tpk", "rotate"], ["tpk", "retire"], ["tpk", "list"],
]


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
def test_every_command_has_help(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*words, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kms {' '.join(words)}")
    # a description paragraph beyond the usage line and the options
    assert len([ln for ln in out.splitlines() if ln.strip()]) >= 4


def test_help_via_subprocess(kms: Run, tmp_path: Path) -> None:
    out = kms(tmp_path, "endpoint", "add", "--help").stdout
    assert "--generate-psk" in out
    assert "16..32 bytes" in out


# --- init ------------------------------------------------------------------------------------


def test_init_result(pristine_home: Path, kms: Run) -> None:
    home = pristine_home
    keys = _keys(kms, home)
    assert sorted(keys) == ["kms/envelope-rsa", "kms/fork-modifier", "kms/signing", "tpk/1"]
    for k in keys.values():
        assert k["present"]
        assert k["sensitive"] is True
        assert k["extractable"] is False
        assert k["never_extractable"] is True  # generated in the token
    assert (keys["kms/envelope-rsa"]["type"], keys["kms/envelope-rsa"]["bits"]) == ("rsa", 2048)
    assert (keys["tpk/1"]["type"], keys["tpk/1"]["bits"]) == ("secret", 256)
    tpks = json.loads(kms(home, "tpk", "list", "--json").stdout)
    assert [(t["version"], t["state"], t["key_label"]) for t in tpks] == [(1, "current", "tpk/1")]
    assert (home / "kms-cert.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    for name in ("token/pin", "token/so-pin"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600
    pin = (home / "token/pin").read_text().strip()
    toml = (home / "kms.toml").read_text()
    assert pin not in toml
    assert 'pin_file = "token/pin"' in toml
    assert f'id = "{KMS_ID}"' in toml
    assert json.loads(kms(home, "endpoint", "list", "--json").stdout) == []


def test_init_refuses_initialised_home(home: Path, kms_fails: Run, snapshot: Run) -> None:
    before = snapshot(home)
    toml = (home / "kms.toml").read_bytes()
    kms_fails(home, "init", "--kms-id", "kms:other", match="already initialised")
    assert (home / "kms.toml").read_bytes() == toml
    assert snapshot(home) == before


def test_init_bad_arguments_create_nothing(tmp_path: Path, kms_fails: Run) -> None:
    home = tmp_path / "new"
    kms_fails(home, "init", "--kms-id", "not a uri", match="--kms-id: must be a URI")
    kms_fails(home, "init", "--kms-id", KMS_ID, "--module", "/nope.so", "--pin-env", "X",
              match="--token-label or --token-serial")
    kms_fails(home, "init", "--kms-id", KMS_ID, "--module", "/nope/libp11.so",
              "--token-label", "t", "--pin-env", "KMS_TEST_PIN_UNSET",
              match=r"PKCS#11 module /nope/libp11\.so not found")
    assert not home.exists()


def test_not_initialised(tmp_path: Path, kms_fails: Run) -> None:
    for words in (["endpoint", "list"], ["keys", "list"], ["tpk", "rotate"],
                  ["group", "add", "g", "m"]):
        kms_fails(tmp_path / "empty", *words, match=r"is not initialised .*kms --home")
    assert not (tmp_path / "empty").exists()


# --- endpoints -------------------------------------------------------------------------------


def test_endpoint_add_list_remove(home: Path, kms: Run, tmp_path: Path) -> None:
    out = kms(home, "endpoint", "add", ALICE, "--psk-hex", PSK_HEX).stdout
    assert "added endpoint sip:alice@example.org (uri), key psk/" in out
    psk_file = tmp_path / "bob.hex"
    psk_file.write_text(PSK32_HEX.upper() + "\n")
    kms(home, "endpoint", "add", BOB, "--psk-file", str(psk_file))
    gen = tmp_path / "carol.psk"
    out = kms(home, "endpoint", "add", "carol@example.org", "--generate-psk", str(gen),
              "--psk-length", "16").stdout
    assert "16-byte PSK written" in out
    assert stat.S_IMODE(gen.stat().st_mode) == 0o600
    generated = gen.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32}", generated)

    eps = _endpoints(kms, home)
    assert sorted(eps) == ["carol@example.org", ALICE, BOB]
    assert eps["carol@example.org"]["id_type"] == "nai"  # guessed: no URI scheme
    assert eps[ALICE]["id_type"] == "uri"
    keys = _keys(kms, home)
    for ident, bits in ((ALICE, 128), (BOB, 256), ("carol@example.org", 128)):
        k = keys[eps[ident]["key_label"]]
        assert (k["type"], k["bits"], k["sensitive"], k["extractable"]) == (
            "secret", bits, True, False)
        assert k["owner"] == f"endpoint {ident}"
        assert ident not in eps[ident]["key_label"]  # labels carry a hash, not the identity

    # never any key value in what the CLI prints
    text = (kms(home, "endpoint", "list").stdout + kms(home, "keys", "list").stdout
            + kms(home, "keys", "list", "--json").stdout)
    for secret in (PSK_HEX, PSK32_HEX, generated):
        assert secret not in text.lower()

    out = kms(home, "endpoint", "remove", ALICE).stdout
    assert "destroyed key psk/" in out
    assert ALICE not in _endpoints(kms, home)
    assert eps[ALICE]["key_label"] not in _keys(kms, home)


def test_endpoint_list_shows_the_psk_version_in_use(home: Path, kms: Run, tmp_path: Path) -> None:
    """After a rotation and the first version's retirement, the listed key is the one in use
    (its token object exists), not the first one, which is destroyed."""
    kms(home, "endpoint", "add", ALICE, "--psk-hex", PSK_HEX)
    first = _endpoints(kms, home)[ALICE]
    assert first["psk_version"] == 1
    kms(home, "endpoint", "rotate-psk", ALICE, "--out", str(tmp_path / "alice-2.psk"))
    kms(home, "endpoint", "retire-psk", ALICE, "1")
    now = _endpoints(kms, home)[ALICE]
    assert now["psk_version"] == 2
    assert now["key_label"] != first["key_label"]
    keys = _keys(kms, home)
    assert now["key_label"] in keys and first["key_label"] not in keys


def test_identities_are_exact_bytes(home: Path, kms: Run, kms_fails: Run) -> None:
    kms(home, "endpoint", "add", ALICE, "--psk-hex", PSK_HEX)
    kms(home, "endpoint", "add", "sip:Alice@example.org", "--psk-hex", PSK_HEX)
    raw = b"\xffraw-id"
    kms(home, "endpoint", "add", raw, "--psk-hex", PSK_HEX)
    eps = json.loads(kms(home, "endpoint", "list", "--json").stdout)
    assert sorted(e["identity_hex"] for e in eps) == sorted(
        i.hex() for i in (ALICE.encode(), b"sip:Alice@example.org", raw))
    assert [e["id_type"] for e in eps if e["identity_hex"] == raw.hex()] == ["bytes"]
    kms(home, "endpoint", "remove", "sip:Alice@example.org")
    kms_fails(home, "endpoint", "remove", "SIP:alice@example.org",
              match="unknown endpoint SIP:alice@example.org")
    kms(home, "endpoint", "remove", raw)
    assert list(_endpoints(kms, home)) == [ALICE]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["endpoint", "add", ALICE, "--psk-hex", PSK_HEX], "endpoint sip:alice@example.org "
         "already exists"),
        (["endpoint", "add", BOB, "--psk-hex", "zz" + PSK_HEX], "not valid hexadecimal"),
        (["endpoint", "add", BOB, "--psk-hex", PSK_HEX + "0"], "not valid hexadecimal"),
        (["endpoint", "add", BOB, "--psk-hex", PSK_HEX[:30]], r"16\.\.32 bytes, got 15"),
        (["endpoint", "add", BOB, "--psk-hex", PSK32_HEX + "00"], r"16\.\.32 bytes, got 33"),
        (["endpoint", "add", BOB, "--psk-file", "/nonexistent/psk"], "No such file"),
        (["endpoint", "add", "sip:x y", "--psk-hex", PSK_HEX, "--id-type", "uri"],
         "not a URI"),
        (["endpoint", "add", BOB, "--generate-psk", "OUT", "--psk-length", "8"],
         r"--psk-length must be 16\.\.32"),
        (["endpoint", "remove", BOB], "unknown endpoint sip:bob@example.org"),
        (["group", "add", "sip:team@x", ALICE, BOB], "unknown group member sip:bob"),
        (["group", "remove", "sip:team@x"], "unknown group sip:team@x"),
        (["tpk", "retire", "1"], "TPK version 1 is the current TPK"),
        (["tpk", "retire", "7"], "unknown TPK version 7"),
        (["keys", "delete-orphan", "tpk/1"], r"tpk/1 is in use \(TPK v1"),
    ],
    ids=lambda v: " ".join(v)[:40] if isinstance(v, list) else "",
)
def test_failures_change_nothing(
    home: Path, kms: Run, kms_fails: Run, snapshot: Run, tmp_path: Path,
    args: list[str], match: str,
) -> None:
    kms(home, "endpoint", "add", ALICE, "--psk-hex", PSK_HEX)
    args = [str(tmp_path / "out.psk") if a == "OUT" else a for a in args]
    before = snapshot(home)
    kms_fails(home, *args, match=match, secrets=(PSK_HEX, PSK32_HEX))
    assert snapshot(home) == before
    assert not (tmp_path / "out.psk").exists()


def test_malformed_psk_file_not_echoed(home: Path, kms_fails: Run, tmp_path: Path) -> None:
    f = tmp_path / "psk"
    f.write_text("secret-looking-but-not-hex\n")
    kms_fails(home, "endpoint", "add", BOB, "--psk-file", str(f), match="not valid hexadecimal",
              secrets=("secret-looking",))
    f.write_bytes(b"\xff\xfe")
    kms_fails(home, "endpoint", "add", BOB, "--psk-file", str(f), match="not valid hexadecimal")


def test_generate_psk_refuses_existing_file(home: Path, kms_fails: Run, tmp_path: Path,
                                            snapshot: Run) -> None:
    out = tmp_path / "exists.psk"
    out.write_text("keep me\n")
    before = snapshot(home)
    kms_fails(home, "endpoint", "add", BOB, "--generate-psk", str(out), match="file exists")
    assert out.read_text() == "keep me\n"
    assert snapshot(home) == before


def test_generate_psk_file_removed_when_add_fails(home: Path, kms: Run, kms_fails: Run,
                                                  tmp_path: Path, snapshot: Run) -> None:
    # The registry step fails after the PSK file was written (a trigger refuses the row):
    # the file must go again (a PSK that is not registered must not linger), and neither
    # the registry nor the token may change.
    conn = sqlite3.connect(home / "registry.sqlite3")
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON endpoints "
                 "BEGIN SELECT RAISE(ABORT, 'injected refusal'); END")
    conn.commit()
    before = snapshot(home)
    out = tmp_path / "bob.psk"
    kms_fails(home, "endpoint", "add", BOB, "--generate-psk", str(out), match="injected")
    assert not out.exists()
    assert snapshot(home) == before
    conn.execute("DROP TRIGGER refuse")
    conn.commit()
    conn.close()
    kms(home, "endpoint", "add", BOB, "--generate-psk", str(out))
    assert out.exists()
    assert BOB in _endpoints(kms, home)


# --- token access ----------------------------------------------------------------------------


def test_wrong_pin(home: Path, kms: Run, kms_fails: Run, registry_rows: Run) -> None:
    kms(home, "endpoint", "add", ALICE, "--psk-hex", PSK_HEX)
    keys_before = kms(home, "keys", "list").stdout
    rows_before = registry_rows(home)
    pin_file = home / "token" / "pin"
    good = pin_file.read_text()
    pin_file.write_text("wrong-pin-123\n")
    for args in (["keys", "list"], ["endpoint", "add", BOB, "--psk-hex", PSK_HEX],
                 ["endpoint", "remove", ALICE], ["tpk", "rotate"], ["tpk", "retire", "1"]):
        kms_fails(home, *args, match=r"cannot open token 'kms' .*PIN",
                  secrets=("wrong-pin-123", good.strip(), PSK_HEX))
    assert registry_rows(home) == rows_before
    pin_file.write_text(good)
    assert kms(home, "keys", "list").stdout == keys_before
    # registry-only commands work without the token
    assert ALICE in kms(home, "endpoint", "list").stdout


def test_missing_module(home: Path, kms: Run, kms_fails: Run, snapshot: Run) -> None:
    before = snapshot(home)
    toml = home / "kms.toml"
    good = toml.read_text()
    toml.write_text(re.sub(r'(?m)^module = ".*"$', 'module = "/opt/nope/libpkcs11.so"', good))
    kms_fails(home, "keys", "list", match=r"PKCS#11 module /opt/nope/libpkcs11\.so not found")
    kms_fails(home, "endpoint", "add", BOB, "--psk-hex", PSK_HEX, match="module")
    kms_fails(home, "tpk", "rotate", match="module")
    toml.write_text(good)
    assert snapshot(home) == before


def test_broken_config_is_one_line(home: Path, kms_fails: Run) -> None:
    toml = home / "kms.toml"
    toml.write_text(toml.read_text().replace('forking = "allowed"', 'forking = "maybe"'))
    kms_fails(home, "endpoint", "list", match=r"kms\.toml: \[policy\] forking: must be one of")


# --- groups ----------------------------------------------------------------------------------


def test_groups(home: Path, kms: Run, kms_fails: Run, snapshot: Run) -> None:
    kms(home, "endpoint", "add", ALICE, "--psk-hex", PSK_HEX)
    kms(home, "endpoint", "add", BOB, "--psk-hex", PSK_HEX)
    team = "sip:team@example.org"
    before = snapshot(home)
    kms_fails(home, "group", "add", team, ALICE, "sip:nobody@example.org",
              match="unknown group member sip:nobody@example.org")
    kms_fails(home, "group", "add", ALICE, BOB, match="already an endpoint")
    assert snapshot(home) == before

    kms(home, "group", "add", team, ALICE)
    kms(home, "group", "add", team, BOB)  # adds to the existing group
    groups = json.loads(kms(home, "group", "list", "--json").stdout)
    assert groups == [{"group": team, "members": [ALICE, BOB]}]
    assert _endpoints(kms, home)[ALICE]["groups"] == [team]

    before = snapshot(home)
    kms_fails(home, "group", "remove", team, ALICE, "sip:nobody@example.org",
              match="unknown group member")
    assert snapshot(home) == before
    kms(home, "group", "remove", team, ALICE)
    groups = json.loads(kms(home, "group", "list", "--json").stdout)
    assert groups == [{"group": team, "members": [BOB]}]
    out = kms(home, "endpoint", "remove", BOB).stdout
    assert f"removed from groups: {team}" in out
    kms(home, "group", "remove", team)
    assert json.loads(kms(home, "group", "list", "--json").stdout) == []
    kms_fails(home, "group", "remove", team, match="unknown group")


# --- TPK -------------------------------------------------------------------------------------


def test_tpk_rotate_retire_list(home: Path, kms: Run, kms_fails: Run, snapshot: Run) -> None:
    assert "TPK version 2 (tpk/2) is now current" in kms(home, "tpk", "rotate").stdout
    kms(home, "tpk", "rotate")
    tpks = json.loads(kms(home, "tpk", "list", "--json").stdout)
    assert [(t["version"], t["state"]) for t in tpks] == [
        (1, "active"), (2, "active"), (3, "current")]
    keys = _keys(kms, home)
    assert {"tpk/1", "tpk/2", "tpk/3"} <= set(keys)
    assert all(keys[f"tpk/{v}"]["bits"] == 256 for v in (1, 2, 3))

    before = snapshot(home)
    kms_fails(home, "tpk", "retire", "3", match="current TPK; rotate")
    assert snapshot(home) == before

    kms(home, "tpk", "retire", "1")
    kms_fails(home, "tpk", "retire", "1", match="already retired")
    tpks = json.loads(kms(home, "tpk", "list", "--json").stdout)
    assert [(t["version"], t["state"]) for t in tpks] == [
        (1, "retired"), (2, "active"), (3, "current")]
    assert "tpk/1" not in _keys(kms, home)
    assert "(tpk/1 destroyed)" in kms(home, "tpk", "list").stdout
    assert "tpk/4" in kms(home, "tpk", "rotate").stdout  # retired numbers are not reused


def test_keys_list_table(pristine_home: Path, kms: Run) -> None:
    out = kms(pristine_home, "keys", "list").stdout
    lines = out.splitlines()
    assert lines[0].split() == ["LABEL", "TYPE", "BITS", "SENSITIVE", "EXTRACTABLE",
                                "NEVER-EXTRACTABLE", "USED", "BY"]
    row = next(ln for ln in lines if ln.startswith("tpk/1"))
    assert row.split()[:6] == ["tpk/1", "secret", "256", "yes", "no", "yes"]


def test_copied_home_does_not_use_the_original_token(
    pristine_home: Path, kms_fails: Run, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(pristine_home, copy)  # softhsm2.conf still names the original token
    kms_fails(copy, "keys", "list", match=r"points at token directory .*fix directories")
