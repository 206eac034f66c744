"""KMS home (init_home / open_home) against real SoftHSM2 tokens, including failure paths.

These run in-process so that failures can be injected between the token step and the
registry commit; the CLI tests (tests/cli) cover the same operations as a user runs them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import hsm
import hsm.provision
from kms.home import (
    DUMMY_PSK_LABEL,
    ENVELOPE_LABEL,
    FORK_MODIFIER_LABEL,
    SIGNING_LABEL,
    Home,
    HomeError,
    HomeExists,
    HomeNotInitialised,
    init_home,
    open_home,
    psk_label,
)
from kms.home import init as home_mod
from kms.keystore import KeyExists, KeyRef, KeyStoreError
from kms.mikey.constants import IdType
from kms.server import certs as certs_mod
from kms.store.registry import DuplicateEndpoint, Registry, RegistryUnavailable

KMS_ID = "kms:kms.example.org"
ALICE = b"sip:alice@example.org"
PSK = bytes(range(16))


def _require_softhsm() -> None:
    # A missing SoftHSM is a broken test environment: fail, never skip.
    assert shutil.which("softhsm2-util"), "softhsm2-util is required (scripts/setup.sh)"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    _require_softhsm()
    h = init_home(tmp_path / "home", KMS_ID)
    yield h
    h.close()


def _labels(h: Home) -> list[str]:
    return [k.label for k in h.keystore().list_keys()]


def _verify_cert(h: Home, pem_name: str, label: str) -> x509.Certificate:
    cert = x509.load_pem_x509_certificate((h.path / pem_name).read_bytes())
    token_pub = serialization.load_der_public_key(h.keystore().public_key_der(KeyRef(label)))
    assert isinstance(token_pub, rsa.RSAPublicKey)
    assert cert.public_key() == token_pub
    token_pub.verify(
        cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
        cert.signature_hash_algorithm,  # type: ignore[arg-type]
    )
    cert.verify_directly_issued_by(cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [KMS_ID]
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 3650 <= days <= 3660
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not bc.ca
    return cert


def test_init_layout_keys_and_certs(home: Home) -> None:
    p = home.path
    for name in ("kms.toml", "registry.sqlite3", "kms-cert.pem", "kms-signing-cert.pem",
                 "token/softhsm2.conf", "token/pin", "token/so-pin"):
        assert (p / name).exists(), name
    assert not (p / home_mod.INIT_MARKER).exists()
    for secret in ("token/pin", "token/so-pin"):
        assert stat.S_IMODE((p / secret).stat().st_mode) == 0o600
    pin = (p / "token/pin").read_text().strip()
    assert pin not in (p / "kms.toml").read_text()
    assert home.config.kms_id == KMS_ID
    assert home.config.token.pin_file == p / "token/pin"
    assert home.config.token.softhsm_conf == p / "token/softhsm2.conf"

    assert _labels(home) == [ENVELOPE_LABEL, FORK_MODIFIER_LABEL, SIGNING_LABEL, "tpk/1"]
    for info in home.keystore().list_keys():
        assert info.sensitive
        assert not info.extractable
    tpk = home.registry.tpk_current()
    assert tpk is not None
    assert (tpk.version, tpk.key_label) == (1, "tpk/1")
    assert home.keystore().key_info("tpk/1").length_bits == 256

    enc = _verify_cert(home, "kms-cert.pem", ENVELOPE_LABEL)
    assert enc.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    sig = _verify_cert(home, "kms-signing-cert.pem", SIGNING_LABEL)
    assert sig.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature


def test_open_home_and_lazy_token(home: Home) -> None:
    path = home.path
    home.close()
    with open_home(path) as h:
        assert h._keystore is None  # the token is opened only when needed
        assert h.registry.tpk_current() is not None
        assert "tpk/1" in _labels(h)


def test_open_home_errors(tmp_path: Path, home: Home) -> None:
    with pytest.raises(HomeNotInitialised, match="not initialised"):
        open_home(tmp_path / "empty")
    path = home.path
    home.close()
    (path / "registry.sqlite3").rename(path / "moved.sqlite3")
    with pytest.raises(RegistryUnavailable, match="does not exist"):
        open_home(path)


def test_init_refuses_existing(home: Home) -> None:
    with pytest.raises(HomeExists, match="already initialised"):
        init_home(home.path, KMS_ID)


def test_init_validates_before_creating(tmp_path: Path) -> None:
    with pytest.raises(HomeError, match="--kms-id: must be a URI"):
        init_home(tmp_path / "h", "no uri")
    with pytest.raises(HomeError, match="need --module"):
        init_home(tmp_path / "h", KMS_ID, pin_env="X")
    with pytest.raises(HomeError, match="exactly one of --pin-env"):
        init_home(tmp_path / "h", KMS_ID, module="/m.so", token_label="t")
    assert not (tmp_path / "h").exists()


def test_init_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _require_softhsm()
    path = tmp_path / "h"

    def boom(*args: object, **kwargs: object) -> bytes:
        raise KeyStoreError("injected failure")

    monkeypatch.setattr(certs_mod, "build_self_signed_cert", boom)
    with pytest.raises(HomeError, match="init failed: injected failure"):
        init_home(path, KMS_ID)
    assert not path.exists()  # we created it, so it is removed again
    monkeypatch.undo()
    init_home(path, KMS_ID).close()  # re-runnable


def test_init_with_external_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _require_softhsm()
    conf = hsm.provision.create_softhsm_token(tmp_path / "tok", "ext", "so-pin-1", "user-pin-1")
    (tmp_path / "pin").write_text("user-pin-1\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    module = hsm.provision.DEFAULT_SOFTHSM_MODULE

    # A failure after keys were generated removes them from the external token again.
    def boom(*args: object, **kwargs: object) -> bytes:
        raise KeyStoreError("injected failure")

    with monkeypatch.context() as m:
        m.setattr(certs_mod, "build_self_signed_cert", boom)
        with pytest.raises(HomeError, match="injected"):
            init_home(tmp_path / "h", KMS_ID, module=module, token_label="ext",
                      pin_file=tmp_path / "pin")
    h = init_home(tmp_path / "h", KMS_ID, module=module, token_label="ext",
                  pin_file=tmp_path / "pin")
    try:
        assert _labels(h) == [ENVELOPE_LABEL, FORK_MODIFIER_LABEL, SIGNING_LABEL, "tpk/1"]
        assert h.config.token.softhsm_conf is None
        assert h.config.token.pin_file == tmp_path / "pin"
        assert not (h.path / "token").exists()
    finally:
        h.close()


def test_interrupted_init_is_cleaned_up_by_rerun(tmp_path: Path) -> None:
    _require_softhsm()
    path = tmp_path / "h"
    init_home(path, KMS_ID).close()
    # Simulate a crash just before kms.toml was written: the marker lists what init made.
    (path / "kms.toml").unlink()
    undo = home_mod._InitUndo(path)
    undo.files = ["token", "registry.sqlite3", "kms-cert.pem", "kms-signing-cert.pem"]
    undo.save()
    with pytest.raises(HomeNotInitialised, match="interrupted"):
        open_home(path)
    init_home(path, "kms:second.example.org").close()
    with open_home(path) as h:
        assert h.config.kms_id == "kms:second.example.org"
        assert _labels(h) == [ENVELOPE_LABEL, FORK_MODIFIER_LABEL, SIGNING_LABEL, "tpk/1"]


def test_init_refuses_foreign_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "h"
    path.mkdir()
    (path / "registry.sqlite3").write_bytes(b"")
    with pytest.raises(HomeError, match="refusing to overwrite"):
        init_home(path, KMS_ID)
    assert (path / "registry.sqlite3").exists()


def test_add_endpoint_commit_failure_destroys_key(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _labels(home)
    real_tx = Registry.transaction

    @contextlib.contextmanager
    def commit_fails(self: Registry) -> Iterator[None]:
        outermost = self._depth == 0
        with real_tx(self):
            yield
            if outermost:  # the body succeeded: fail where COMMIT would, rolling back
                raise RegistryUnavailable("commit failed: injected")

    with monkeypatch.context() as m:
        m.setattr(Registry, "transaction", commit_fails)
        with pytest.raises(RegistryUnavailable, match="injected"):
            home.add_endpoint(ALICE, IdType.URI, PSK)
        with pytest.raises(RegistryUnavailable, match="injected"):
            home.rotate_tpk()
    assert _labels(home) == before  # the imported PSK and the new TPK were destroyed again
    assert home.registry.list_endpoints() == []
    assert [t.version for t in home.registry.tpk_versions()] == [1]


def test_add_endpoint_token_failure_leaves_no_row(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    ks = home.keystore()

    def refuse(label: str, value: bytes) -> None:
        raise KeyStoreError("token full (injected)")

    monkeypatch.setattr(ks, "import_secret", refuse)
    with pytest.raises(KeyStoreError, match="injected"):
        home.add_endpoint(ALICE, IdType.URI, PSK)
    assert home.registry.list_endpoints() == []


def test_orphan_object_is_listed_and_never_reused(home: Home) -> None:
    ks = home.keystore()
    orphan = psk_label(ALICE)
    ks.import_secret(orphan, PSK)  # as if a crash happened before the commit
    ep = home.add_endpoint(ALICE, IdType.URI, PSK)
    assert ep.key_label != orphan  # labels are fresh per import: the orphan is not adopted
    orphans = [e.label for e in home.key_inventory() if e.owner is None]
    assert orphans == [orphan]
    with pytest.raises(HomeError, match="in use"):
        home.delete_orphan("tpk/1")
    with pytest.raises(HomeError, match="in use"):
        home.delete_orphan(ep.key_label)
    home.delete_orphan(orphan)
    assert [e.label for e in home.key_inventory() if e.owner is None] == []
    with pytest.raises(DuplicateEndpoint):
        home.add_endpoint(ALICE, IdType.URI, PSK)
    with pytest.raises(KeyExists):
        ks.import_secret(ep.key_label, PSK)


def test_labels_are_never_reused(home: Home) -> None:
    first = home.add_endpoint(ALICE, IdType.URI, PSK).key_label
    home.remove_endpoint(ALICE)
    second = home.add_endpoint(ALICE, IdType.URI, PSK).key_label
    assert first != second
    assert first.split(".")[0] == second.split(".")[0]  # same identity hash, fresh suffix


def test_endpoint_and_tpk_lifecycle(home: Home) -> None:
    ep = home.add_endpoint(ALICE, IdType.URI, PSK)
    assert ep.key_label.startswith("psk/")
    assert ALICE.hex() not in ep.key_label  # no raw identity in token labels
    info = home.keystore().key_info(ep.key_label)
    assert (info.length_bits, info.sensitive, info.extractable) == (128, True, False)
    home.registry.add_group(b"sip:team@example.org", [ALICE])
    home.remove_endpoint(ALICE)
    assert ep.key_label not in _labels(home)
    assert home.registry.group_members(b"sip:team@example.org") == []

    assert home.rotate_tpk().version == 2
    assert home.rotate_tpk().version == 3
    assert [(t.version, t.state.value) for t in home.registry.tpk_versions()] == [
        (1, "active"), (2, "active"), (3, "current")]
    home.retire_tpk(1)
    assert "tpk/1" not in _labels(home)
    assert home.rotate_tpk().version == 4  # retired numbers are not reused


def test_pin_file_permissions_not_loosened_by_copy(home: Home) -> None:
    # The user PIN is readable by the owner only; os.open(O_EXCL) refuses to overwrite.
    with pytest.raises(FileExistsError):
        home_mod._write_secret_file(home.path / "token/pin", "x")
    assert os.stat(home.path / "token/pin").st_mode & 0o077 == 0


def test_kms_wide_secrets_are_owned_not_orphans(home: Home) -> None:
    """The dummy PSK (made by `kms serve` on first use) and the forking modifier key are the
    KMS's own: listed with an owner, never offered for deletion as orphans."""
    home.keystore().generate_secret(DUMMY_PSK_LABEL, 32)
    owners = {e.label: e.owner for e in home.key_inventory()}
    assert owners[DUMMY_PSK_LABEL] and "dummy" in owners[DUMMY_PSK_LABEL]
    assert owners[FORK_MODIFIER_LABEL]
    for label in (DUMMY_PSK_LABEL, FORK_MODIFIER_LABEL):
        with pytest.raises(HomeError, match="in use"):
            home.delete_orphan(label)
