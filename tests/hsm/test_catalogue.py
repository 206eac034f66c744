"""The handle catalogue when other processes change the token under it: adopting a new
object that does not read back under its label, and a scan meeting an object that went away.

SoftHSM 2.6.1's file store loses CKA_LABEL of an object created while another process reads
or writes the token (measured with two processes, docs/design.md); a worker creating the
dummy PSK at start while another worker scanned the token then failed with a bare
``KeyError: 'authn/dummy'``. These tests hand ``adopt`` such an object on a real token: it is
labelled again, or, when that cannot be done, the error says what happened."""

from __future__ import annotations

import hmac
from typing import Any

import pytest
from pkcs11 import Attribute, ObjectClass
from pkcs11 import KeyType as P11KeyType

from hsm import open_keystore
from hsm.pkcs11.admin import SECRET_TEMPLATE
from hsm.pkcs11.catalogue import LEN_MARKER, adopt, scan
from hsm.pkcs11.state import PooledSession
from hsm.pkcs11.store import Pkcs11KeyStore
from kms.keystore import Digest, KeyRef, KeyStoreError
from tests.hsm.conftest import SoftToken

VALUE = bytes(range(32))


def _unlabelled(ps: Any, modifiable: bool) -> Any:
    """A secret as SoftHSM leaves it when the race strikes: created, but CKA_LABEL empty."""
    attrs: dict[Attribute, Any] = dict(SECRET_TEMPLATE)
    attrs.update({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: P11KeyType.GENERIC_SECRET,
        Attribute.LABEL: "", Attribute.ID: LEN_MARKER + b"32", Attribute.VALUE: VALUE,
        Attribute.MODIFIABLE: modifiable,
    })  # fmt: skip
    return ps.session.create_object(attrs)


def test_new_object_without_its_label_is_labelled_again(softhsm_token: SoftToken) -> None:
    ks = open_keystore(softhsm_token.config())
    assert isinstance(ks, Pkcs11KeyStore)
    try:
        with ks._t().manage("test") as (conn, ps):
            info = adopt(conn, "authn/dummy", [_unlabelled(ps, modifiable=True)])
        assert info.label == "authn/dummy" and info.length_bits == 256
        expected = hmac.digest(VALUE, b"x", "sha1")
        assert ks.hmac(KeyRef("authn/dummy"), b"x", Digest.SHA1) == expected
        ks.refresh()  # a fresh scan finds it under its label: the token object was fixed
        assert ks.hmac(KeyRef("authn/dummy"), b"x", Digest.SHA1) == expected
    finally:
        ks.close()


def test_object_that_cannot_be_labelled_again_is_a_clear_error(softhsm_token: SoftToken) -> None:
    ks = open_keystore(softhsm_token.config())
    assert isinstance(ks, Pkcs11KeyStore)
    try:
        with (
            pytest.raises(KeyStoreError, match="'authn/dummy' was created but does not read "
                          "back under its label, and setting it again failed"),
            ks._t().manage("test") as (conn, ps),
        ):  # fmt: skip
            adopt(conn, "authn/dummy", [_unlabelled(ps, modifiable=False)])
    finally:
        ks.close()


class VanishingSession:
    """A session whose first search is overtaken by another process deleting every object
    but the first one found, after C_FindObjects returned their handles (what a second
    worker scanning while `kms node remove` or `retire-psk` ran saw)."""

    def __init__(self, real: Any, doomed: list[Any]) -> None:
        self.real = real
        self.doomed = doomed

    def get_objects(self, attrs: Any = None) -> Any:
        found = self.real.get_objects(attrs)
        yield next(found)
        for obj in self.doomed:
            if obj.handle is not None:
                obj.destroy()
        self.doomed = []
        yield from found


def test_scan_meeting_a_vanished_object_scans_again(softhsm_token: SoftToken) -> None:
    ks = open_keystore(softhsm_token.config())
    assert isinstance(ks, Pkcs11KeyStore)
    try:
        for name in ("a", "b", "c", "d"):
            ks.import_secret(f"scan/{name}", VALUE)
        with ks._t().manage("test") as (_conn, ps):
            first = next(iter(ps.session.get_objects()))[Attribute.LABEL]
            doomed = [o for o in ps.session.get_objects() if o[Attribute.LABEL] != first]
            keys = scan([PooledSession(VanishingSession(ps.session, doomed))])
        assert set(keys) == {first}  # the second scan: only what is still there, no error
    finally:
        ks.close()
