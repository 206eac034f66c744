"""``kms token check`` on SoftHSM2 (the home's token) and openCryptoki (a PKCS#11 URI), and
its refusals; ``kms init --token-uri`` refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hsm.pkcs11.mechanisms import Operation
from hsm.pkcs11.token_check import CheckReport, OperationRow, Probe, render_text
from hsm.provision import DEFAULT_SOFTHSM_MODULE
from hsm.uri import token_uri
from tests.cli.conftest import _run
from tests.token_modules import OckToken

FAST = ("--iterations", "10", "--threads", "4")


def test_check_of_the_home_token_on_softhsm(pristine_home: Path, kms: Any) -> None:
    out = kms(pristine_home, "token", "check", *FAST).stdout
    assert "(SoftHSM)" in out.splitlines()[1]
    rows = {line.split()[0]: line for line in out.splitlines() if line[:1].islower()}
    assert "CKM_AES_CTR" in rows["aes-cm-128"]
    assert "(" not in rows["aes-cm-128"].split("CKM_AES_CTR")[1].split("[")[0]  # no fallback
    assert "CKM_SHA256_RSA_PKCS " in rows["sign-rsa-pkcs1v15-sha256"] + " "
    for op in ("hmac-sha1", "hmac-sha256", "aes-cm-128", "rsa-decrypt-pkcs1v15", "random"):
        assert " us " in rows[op], rows[op]  # timed
        assert rows[op].split()[1] == "yes"  # the home's configuration needs it
    assert "4 threads at once" in out
    assert "FAILED" not in out
    assert out.rstrip().endswith("verdict: the KMS can run on this token")


def test_check_of_opencryptoki_by_uri_as_json(ock_token: OckToken, tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text(ock_token.user_pin)
    uri = token_uri(ock_token.label, module=ock_token.module, pin_file=str(pin))
    proc = _run(tmp_path / "no-home", "token", "check", "--token-uri", uri, "--json", *FAST)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["can_run"] is True
    assert "IBM" in report["library"]
    ops = {r["operation"]: r for r in report["operations"]}
    assert ops["aes-cm-128"]["uses"].startswith("CKM_AES_ECB (AES-ECB of the counter blocks")
    assert ops["sign-rsa-pkcs1v15-sha256"]["uses"].startswith("CKM_RSA_PKCS (host SHA hash")
    assert ops["generate-ec-p256"]["uses"] is None
    assert ops["generate-ec-p256"]["needed"] is False
    assert ops["generate-ec-p256"]["missing"] == "CKM_EC_KEY_PAIR_GEN (not offered)"
    for name in ("hmac-sha1", "aes-cm-128", "aes-cm-256", "rsa-decrypt-pkcs1v15",
                 "sign-rsa-pkcs1v15-sha256"):
        assert ops[name]["needed"] is True
        assert ops[name]["error"] is None
        assert ops[name]["median_us"] > 0
    probes = {p["name"]: p for p in report["probes"]}
    assert set(probes) == {"session objects (C_CreateObject)", "non-extractable secrets",
                           "copies (C_CopyObject)", "non-extractable RSA keys",
                           "4 threads at once"}
    assert all(p["ok"] for p in probes.values()), probes
    assert ock_token.user_pin not in proc.stdout + proc.stderr


def test_check_refuses_what_cannot_be_opened(tmp_path: Path, ock_token: OckToken) -> None:
    pin = tmp_path / "pin"
    pin.write_text("99999999")
    # A wrong PIN: exit 1, the verdict, and never the PIN.
    proc = _run(tmp_path, "token", "check", "--module", ock_token.module, "--token-label",
                ock_token.label, "--pin-file", str(pin), *FAST)
    assert proc.returncode == 1
    assert "error: cannot open the token: " in proc.stdout
    assert "PIN rejected" in proc.stdout
    assert "the KMS CANNOT run on this token" in proc.stdout
    assert "99999999" not in proc.stdout + proc.stderr
    # Not a PKCS#11 module at all.
    proc = _run(tmp_path, "token", "check", "--module", str(pin), "--token-label", "x",
                "--pin-file", str(pin), *FAST)
    assert proc.returncode == 1
    assert "CANNOT run" in proc.stdout


def test_cli_refusals_are_one_line(tmp_path: Path, kms_fails: Callable[..., str]) -> None:
    kms_fails(tmp_path, "token", "check", "--token-uri", "pkcs11:token=k?pin-value=12345678",
              match=r"--token-uri: pin-value is refused", secrets=("12345678",))
    kms_fails(tmp_path, "token", "check", "--token-uri", "pkcs11:token=k?pin-source=env:KMS_P",
              match=r"name the module")
    kms_fails(tmp_path, "token", "check", "--module", "/a.so", "--token-uri",
              f"pkcs11:token=k?module-path={DEFAULT_SOFTHSM_MODULE}",
              match=r"--module '/a.so' differs from the --token-uri's")
    kms_fails(tmp_path / "nohome", "token", "check", match=r"kms.toml")
    kms_fails(tmp_path / "h", "init", "--kms-id", "kms:x", "--token-uri",
              "pkcs11:token=k;object=psk;type=secret-key", match=r"names a key")


def test_verdict_follows_needed_operations_and_probes() -> None:
    ok_row = OperationRow("hmac-sha1", True, "CKM_SHA_1_HMAC", None, "20..512", 10.0)
    optional_missing = OperationRow("generate-ec-p256", False, None, "CKM_EC_KEY_PAIR_GEN", None)
    report = CheckReport("/m.so", operations=[ok_row, optional_missing],
                         probes=[Probe("copies (C_CopyObject)", False, False, "refused")])
    assert report.can_run  # nothing needed is missing or failed
    report.operations.append(OperationRow(Operation.AES_CM_128.value, True, None,
                                          "CKM_AES_CTR (not offered)", None))
    assert not report.can_run
    text = render_text(report)
    assert "MISSING: CKM_AES_CTR (not offered)" in text
    assert "the KMS CANNOT run on this token" in text
    report.operations.pop()
    report.probes.append(Probe("4 threads at once", True, False, "wrong HMAC"))
    assert not report.can_run


def test_keys_are_named_by_pkcs11_uris(home: Path, kms: Any,
                                       kms_fails: Callable[..., str]) -> None:
    from hsm.uri import parse_uri
    from kms.server.home import open_home

    with open_home(home) as h:
        h.keystore().import_secret("orphan/x", bytes(16))
        token = h.config.token.label
    assert token is not None
    keys = {k["label"]: k for k in json.loads(kms(home, "keys", "list", "--json").stdout)}
    uri = keys["orphan/x"]["uri"]
    assert uri == f"pkcs11:token={token};object=orphan%2Fx;type=secret-key"
    assert parse_uri(keys["tpk/1"]["uri"]).object_label == "tpk/1"
    rsa_uris = [k["uri"] for k in keys.values() if k.get("type") == "rsa"]
    assert len(rsa_uris) == 2
    assert all(u.endswith(";type=private") for u in rsa_uris)
    kms_fails(home, "keys", "delete-orphan", "pkcs11:token=other;object=orphan%2Fx",
              match=r"names token 'other', not this home's")
    kms_fails(home, "keys", "delete-orphan", f"pkcs11:token={token}",
              match=r"names no key")
    out = kms(home, "keys", "delete-orphan", uri).stdout
    assert out.strip() == "destroyed orphan token object orphan/x"
    assert "orphan/x" not in {k["label"] for k in json.loads(
        kms(home, "keys", "list", "--json").stdout)}
