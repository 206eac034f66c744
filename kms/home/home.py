"""The opened KMS home: configuration, registry, stores and (lazily) the token.

Every operation that touches both the token and the registry is all-or-nothing: the
registry write transaction (BEGIN IMMEDIATE, so concurrent operators serialise) is opened
first, the row written, then the token object created or destroyed, and only then the
transaction committed; a token failure rolls the row back, a commit failure destroys the
object that was just created.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import hsm
import hsm.provision
from kms.home.errors import HomeError, HomeNotInitialised
from kms.home.identity import guess_id_type, validate_identity
from kms.home.layout import (
    DUMMY_PSK_LABEL,
    INIT_MARKER,
    KMS_OWN_KEYS,
    PSK_MAX_BYTES,
    PSK_MIN_BYTES,
    SOFTHSM_CONF,
    TOKEN_DIR,
    TPK_BYTES,
    node_label,
    peer_label,
    psk_label,
    tpk_label,
)
from kms.keystore import KeyExists, KeyInfo, KeyNotFound, KeyStore, KeyStoreError
from kms.mikey.constants import IdType
from kms.server.config import (
    CONFIG_FILE,
    KmsConfig,
)
from kms.server.stores import SqliteStores, Stores, open_stores
from kms.server.token_needs import required_operations
from kms.store.nodes import Node, NodeRole
from kms.store.registry import (
    DuplicateEndpoint,
    Endpoint,
    InvalidTpkState,
    Peer,
    PeerAuth,
    Registry,
    TpkState,
    TpkVersion,
    show_identity,
)

T = TypeVar("T")


@dataclass(frozen=True)
class KeyEntry:
    """One line of ``kms keys list``: a token object and/or the registry row naming it."""

    label: str
    info: KeyInfo | None  # None: the registry names it but the token has no such object
    owner: str | None  # None: an orphan (token object nothing refers to)


class Home:
    """An opened KMS home. Not thread-safe: one per thread (the registry is per thread)."""

    def __init__(
        self, path: Path, config: KmsConfig, registry: Registry, stores: Stores | None = None
    ) -> None:
        self.path = path
        self.config = config
        self.registry = registry
        # The store backend ([store] in kms.toml): SQLite files here, or PostgreSQL.
        self.stores: Stores = stores if stores is not None else SqliteStores(config)
        self._keystore: KeyStore | None = None

    # --- token ----------------------------------------------------------------------------
    def token_config(self) -> hsm.TokenConfig:
        """The hsm.TokenConfig for this home (reads the PIN from pin_env / pin_file)."""
        t = self.config.token
        pin = hsm.read_pin(t.pin_env, None if t.pin_file is None else str(t.pin_file))
        return hsm.TokenConfig(
            module=t.module,
            token_label=t.label,
            token_serial=t.serial,
            pin=pin,
            softhsm_conf=None if t.softhsm_conf is None else str(t.softhsm_conf),
        )

    def keystore(self) -> KeyStore:
        """The token, opened (and logged in) on first use."""
        if self._keystore is None:
            t = self.config.token
            if os.path.sep in t.module and not os.path.exists(t.module):
                raise HomeError(
                    f"PKCS#11 module {t.module} not found ([token] module in "
                    f"{self.path / CONFIG_FILE})"
                )
            if t.softhsm_conf is not None:
                self._check_embedded_softhsm_conf(t.softhsm_conf)
            config = self.token_config()
            what = t.label if t.label is not None else f"serial {t.serial}"
            try:
                self._keystore = hsm.open_keystore(
                    config, require=required_operations(self.config)
                )
            except KeyStoreError as exc:
                raise HomeError(f"cannot open token {what!r} ({t.module}): {exc}") from None
        return self._keystore

    def _check_embedded_softhsm_conf(self, conf: Path) -> None:
        """softhsm2.conf names its token directory by absolute path. If this home was moved
        or copied, the embedded conf would still point at the *original* token, and the copy
        would silently operate on someone else's keys: refuse instead."""
        if not conf.exists():
            raise HomeError(f"SoftHSM configuration {conf} not found")
        embedded = self.path / SOFTHSM_CONF
        if conf != embedded:
            return  # an operator-managed conf: not ours to judge
        expected = (self.path / TOKEN_DIR / "tokens").resolve()
        for line in conf.read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "directories.tokendir":
                actual = Path(value.strip()).resolve()
                if actual != expected:
                    raise HomeError(
                        f"{conf} points at token directory {actual}, not this home's "
                        f"{expected} (home moved or copied?); fix directories.tokendir"
                    )

    def close(self) -> None:
        if self._keystore is not None:
            with contextlib.suppress(Exception):
                self._keystore.close()
            self._keystore = None
        self.registry.close()
        self.stores.close()

    def __enter__(self) -> Home:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- endpoints ------------------------------------------------------------------------
    def add_endpoint(self, identity: bytes, id_type: IdType, psk: bytes) -> Endpoint:
        """Register an endpoint and import its PSK into the token (all or nothing)."""
        validate_identity(identity, id_type)
        if not PSK_MIN_BYTES <= len(psk) <= PSK_MAX_BYTES:
            raise HomeError(
                f"PSK must be {PSK_MIN_BYTES}..{PSK_MAX_BYTES} bytes, got {len(psk)}"
            )
        # Checked again inside the transaction; checking now avoids opening the token (and
        # asking for its PIN) for an operation that cannot succeed.
        if self.registry.find_endpoint(identity) is not None:
            raise DuplicateEndpoint(f"endpoint {show_identity(identity)} already exists")
        label = psk_label(identity)
        return self._with_new_key(
            lambda: (self.registry.add_endpoint(identity, id_type, label), label),
            lambda ks, lbl: ks.import_secret(lbl, psk),
        )

    def remove_endpoint(self, identity: bytes) -> Endpoint:
        """Unregister an endpoint (and its group memberships) and destroy its PSK."""
        ks = self.keystore()
        with self.registry.transaction():
            versions = self.registry.psk_versions(identity)  # rotated PSKs (v2, v3, ...)
            endpoint = self.registry.remove_endpoint(identity)
            labels = {endpoint.key_label} | {v.key_label for v in versions if not v.retired}
            for label in sorted(labels):
                with contextlib.suppress(KeyNotFound):  # already gone: nothing to destroy
                    ks.delete(label)
        return endpoint

    # --- intermediate nodes (RFC 6043 11.1) ------------------------------------------------
    def add_node(
        self,
        identity: bytes,
        role: NodeRole,
        psk: bytes | None,
        *,
        initiators: tuple[str, ...] = (),
        responders: tuple[str, ...] = (),
        groups: tuple[str, ...] = (),
        cert_pem: str | None = None,
    ) -> Node:
        """Register an intermediate node and import its PSK into the token (all or nothing),
        or, with ``cert_pem`` instead of a PSK, pin its signing certificate."""
        validate_identity(identity, guess_id_type(identity))
        reg = self.registry

        def add(label: str | None) -> Node:
            return reg.add_node(
                identity, role, label, initiators=initiators, responders=responders,
                groups=groups, cert_pem=cert_pem,
            )  # fmt: skip

        if psk is None:
            if cert_pem is None:
                raise HomeError("a node needs a PSK or a certificate")
            return add(None)
        if not PSK_MIN_BYTES <= len(psk) <= PSK_MAX_BYTES:
            raise HomeError(
                f"PSK must be {PSK_MIN_BYTES}..{PSK_MAX_BYTES} bytes, got {len(psk)}"
            )
        label = node_label(identity)

        def row() -> tuple[Node, str]:
            return add(label), label

        return self._with_new_key(row, lambda ks, lbl: ks.import_secret(lbl, psk))

    def remove_node(self, identity: bytes) -> Node:
        """Unregister a node and destroy its PSKs (every live version, when rotated): it is
        refused from the next request on."""
        ks = self.keystore()
        with self.registry.transaction():
            versions = self.registry.psk_versions(identity)  # rotated PSKs (v2, v3, ...)
            node = self.registry.remove_node(identity)
            labels = {v.key_label for v in versions if not v.retired}
            if node.key_label is not None:
                labels.add(node.key_label)
            for label in sorted(labels):
                with contextlib.suppress(KeyNotFound):
                    ks.delete(label)
        return node

    # --- peers (federation, RFC 6043 9) --------------------------------------------------
    def add_peer(
        self,
        kms_id: bytes,
        address: str,
        *,
        psk: bytes | None = None,
        cert_pem: str | None = None,
        ca_pem: str | None = None,
        resolve_for: tuple[str, ...] = (),
        rate_limit: float = 0.0,
        deadline_ms: int = 2000,
    ) -> Peer:
        """Register a peer KMS; its PSK (when given) goes into the token like an endpoint's,
        under peer_label(kms_id), all or nothing with the registry row."""
        if psk is not None and not PSK_MIN_BYTES <= len(psk) <= PSK_MAX_BYTES:
            raise HomeError(
                f"PSK must be {PSK_MIN_BYTES}..{PSK_MAX_BYTES} bytes, got {len(psk)}"
            )
        if kms_id == self.config.kms_id_bytes:
            raise HomeError("a KMS cannot be its own peer")
        auth = PeerAuth.PSK if psk is not None else PeerAuth.CERT
        if psk is None:
            return self.registry.add_peer(
                kms_id, address, auth, cert_pem=cert_pem, ca_pem=ca_pem,
                resolve_for=resolve_for, rate_limit=rate_limit, deadline_ms=deadline_ms,
            )  # fmt: skip
        label = peer_label(kms_id)
        secret = psk

        def row() -> tuple[Peer, str]:
            peer = self.registry.add_peer(
                kms_id, address, auth, key_label=label, cert_pem=cert_pem, ca_pem=ca_pem,
                resolve_for=resolve_for, rate_limit=rate_limit, deadline_ms=deadline_ms,
            )  # fmt: skip
            return peer, label

        return self._with_new_key(row, lambda ks, lbl: ks.import_secret(lbl, secret))

    def remove_peer(self, kms_id: bytes) -> Peer:
        """Unregister a peer KMS and destroy the key shared with it (every live version,
        when rotated)."""
        peer = self.registry.get_peer(kms_id)  # UnknownPeer before the token is opened
        if peer.key_label is None:
            return self.registry.remove_peer(kms_id)
        ks = self.keystore()
        with self.registry.transaction():
            versions = self.registry.psk_versions(kms_id)  # rotated keys (v2, v3, ...)
            peer = self.registry.remove_peer(kms_id)
            labels = {v.key_label for v in versions if not v.retired}
            if peer.key_label is not None and not any(
                v.retired and v.key_label == peer.key_label for v in versions
            ):
                labels.add(peer.key_label)
            for label in sorted(labels):
                with contextlib.suppress(KeyNotFound):
                    ks.delete(label)
        return peer

    # --- TPK ----------------------------------------------------------------------------
    def rotate_tpk(self) -> TpkVersion:
        """Create a new TPK version and make it current; the old current one stays active."""
        def row() -> tuple[TpkVersion, str]:
            # Inside the write transaction: concurrent rotations serialise on it.
            version = self.registry.next_tpk_version()
            label = tpk_label(version)
            return self.registry.add_tpk_version(version, label, TpkState.CURRENT), label

        return self._with_new_key(row, lambda ks, lbl: ks.generate_secret(lbl, TPK_BYTES))

    def retire_tpk(self, version: int) -> TpkVersion:
        """Retire an active TPK: tickets under it stop resolving and its key is destroyed."""
        ks = self.keystore()
        with self.registry.transaction():
            tpk = self.registry.get_tpk(version)
            if tpk.state is TpkState.RETIRED:
                raise InvalidTpkState(f"TPK version {version} is already retired")
            retired = self.registry.set_tpk_state(version, TpkState.RETIRED)
            with contextlib.suppress(KeyNotFound):
                ks.delete(tpk.key_label)
        return retired

    # --- inventory ------------------------------------------------------------------------
    def key_owners(self) -> dict[str, str]:
        owners = self.registry.key_owners()
        owners.update(KMS_OWN_KEYS)
        return owners

    def key_inventory(self) -> list[KeyEntry]:
        """Token objects joined with what the registry says they are; never values."""
        owners = self.key_owners()
        infos = {k.label: k for k in self.keystore().list_keys()}
        labels = sorted(set(infos) | set(owners))
        retired = {t.key_label for t in self.registry.tpk_versions() if t.state is TpkState.RETIRED}
        # Made by `kms serve` on first use: not missing before the KMS has served.
        optional = retired | {DUMMY_PSK_LABEL}
        return [
            KeyEntry(label, infos.get(label), owners.get(label))
            for label in labels
            if label in infos or label not in optional  # a retired TPK has no object: fine
        ]

    def delete_orphan(self, label: str) -> None:
        """Destroy a token object that nothing in the registry refers to."""
        if label in self.key_owners():
            raise HomeError(f"{label} is in use ({self.key_owners()[label]}); not an orphan")
        self.keystore().delete(label)

    # --- helpers --------------------------------------------------------------------------
    def _with_new_key(
        self,
        row: Callable[[], tuple[T, str]],
        make: Callable[[KeyStore, str], object],
    ) -> T:
        """All or nothing: inside one registry write transaction, ``row()`` writes the
        registry row and returns it with the label of its token object, ``make`` creates that
        object, then the transaction commits. A failure before the object exists rolls the
        row back; a failure after it (only the COMMIT is left) also destroys the object."""
        ks = self.keystore()
        created: str | None = None
        try:
            with self.registry.transaction():
                written, label = row()
                self._create(label, lambda: make(ks, label))
                created = label  # from here on only the COMMIT can still fail
        except BaseException:
            self._undo_create(ks, created)
            raise
        return written

    def _create(self, label: str, make: Callable[[], object]) -> None:
        try:
            make()
        except KeyExists:
            raise HomeError(
                f"the token already holds an object labelled {label} that the registry "
                "does not know (left by an interrupted command?); check it with "
                f"`kms keys list` and remove it with `kms keys delete-orphan {label}`"
            ) from None

    @staticmethod
    def _undo_create(ks: KeyStore, label: str | None) -> None:
        """The registry transaction did not commit after ``label`` was created: destroy it."""
        if label is not None:
            with contextlib.suppress(Exception):
                ks.delete(label)




def open_home(home: Path) -> Home:
    """Open an initialised home (kms.toml and registry); the token is opened lazily."""
    home = home.absolute()
    if not (home / CONFIG_FILE).exists():
        if (home / INIT_MARKER).exists():
            raise HomeNotInitialised(
                f"KMS home {home} is not initialised (an earlier init was interrupted); "
                f"run `kms --home {home} init` again"
            )
        raise HomeNotInitialised(
            f"KMS home {home} is not initialised (no {CONFIG_FILE}); "
            f"run `kms --home {home} init --kms-id URI`"
        )
    from kms.server.config import load_config

    config = load_config(home)
    stores = open_stores(config)
    try:
        registry = stores.open_registry()
    except BaseException:
        stores.close()
        raise
    return Home(home, config, registry, stores)


