"""The KMS home folder: configuration, registry and (by default) the SoftHSM2 token.

Layout::

    <home>/kms.toml              configuration (written last by init: its presence means
                                 "initialised")
    <home>/registry.sqlite3      endpoints, groups, TPK versions, peers (labels, no secrets)
    <home>/kms-cert.pem          self-signed certificate of the PKE envelope key
    <home>/kms-signing-cert.pem  self-signed certificate of the SIGNkms key
    <home>/token/                embedded SoftHSM2 token (only when init got no --module):
        softhsm2.conf, tokens/, pin (user PIN, 0600), so-pin (SO PIN, 0600)

Token labels (CKA_LABEL) are chosen so that no raw identity ends up in the token: identities
are arbitrary bytes up to 64 KiB, may be personal data, and labels are shown by every
PKCS#11 tool. So:

    psk/<first 32 hex digits of SHA-256(identity)>   endpoint PSK (128-bit prefix)
    peer/<first 32 hex digits of SHA-256(kms id)>    peer-KMS PSK (federation)
    tpk/<version>                                    Ticket Protection Key
    kms/envelope-rsa                                 RSA-2048 PKE envelope key
    kms/signing                                      RSA-2048 SIGNkms key

The registry maps identities to labels (the key_label columns are UNIQUE, so even a prefix
collision could not make two identities share a key). The signing key is RSA, not EC:
MIKEY's SIGN payload only defines RSA (PKCS#1 v1.5 and PSS, reference 1.7).

Every operation that touches both the token and the registry is all-or-nothing: the
registry write transaction (BEGIN IMMEDIATE, so concurrent operators serialise) is opened
first, the row written, then the token object created or destroyed, and only then the
transaction committed; a token failure rolls the row back, a commit failure destroys the
object that was just created.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hsm
import hsm.provision
from kms.keystore import KeyExists, KeyInfo, KeyNotFound, KeyRef, KeyStore, KeyStoreError
from kms.server import certs
from kms.server.config import (
    CONFIG_FILE,
    URI_RE,
    ConfigError,
    KmsConfig,
    parse_config,
    render_config,
)
from kms.server.stores import SqliteStores, Stores, open_stores
from kms.server.token_needs import required_operations
from kms.store.registry import (
    REGISTRY_FILE,
    DuplicateEndpoint,
    Endpoint,
    IdType,
    InvalidTpkState,
    Peer,
    PeerAuth,
    Registry,
    RegistryError,
    TpkState,
    TpkVersion,
    show_identity,
)

TOKEN_DIR = "token"  # noqa: S105 - a folder name, not a password
PIN_FILE = "token/pin"
SO_PIN_FILE = "token/so-pin"
SOFTHSM_CONF = "token/softhsm2.conf"
CERT_FILE = "kms-cert.pem"
SIGNING_CERT_FILE = "kms-signing-cert.pem"
INIT_MARKER = ".kms-init-incomplete"
EMBEDDED_TOKEN_LABEL = "kms"  # noqa: S105 - a token label, not a password

ENVELOPE_LABEL = "kms/envelope-rsa"
SIGNING_LABEL = "kms/signing"
RSA_BITS = 2048
TPK_BYTES = 32
PSK_MIN_BYTES = 16  # RFC 6043 12.1: long-term keys of at least 128 bits
PSK_MAX_BYTES = 32  # one PRF in-key slice; what the token stores (reference 12)


class HomeError(Exception):
    """A user-facing problem with the KMS home; one line, never a secret."""


class HomeNotInitialised(HomeError):
    """The folder has no kms.toml."""


class HomeExists(HomeError):
    """init was asked to overwrite an initialised home."""


# Token labels of secrets are never reused: each import gets a fresh suffix, and the registry
# row records the label. A process that cached a key under a label (the token store keeps
# working copies in session objects) can then never use it for a different key, even when
# another process removes an endpoint and adds it again with a new PSK. Homes made before
# the suffix keep their labels (the registry holds them).


def _fresh_label(kind: str, identity: bytes) -> str:
    """``<kind>/<identity hash>.<fresh suffix>`` (no raw identity in token labels)."""
    return f"{kind}/{hashlib.sha256(identity).hexdigest()[:32]}.{secrets.token_hex(4)}"


def psk_label(identity: bytes) -> str:
    return _fresh_label("psk", identity)


def peer_label(kms_id: bytes) -> str:
    return _fresh_label("peer", kms_id)


def tpk_label(version: int) -> str:
    return f"tpk/{version}"


def validate_identity(identity: bytes, id_type: IdType) -> None:
    """Shape checks per ID type; identities are still stored and compared as exact bytes."""
    if not identity:
        raise HomeError("identity must not be empty")
    if len(identity) > 0xFFFF:
        raise HomeError("identity longer than 65535 bytes (IDR length field)")
    if id_type is IdType.BYTES:
        return
    try:
        text = identity.decode("utf-8")
    except UnicodeDecodeError:
        raise HomeError(
            f"identity {show_identity(identity)} is not UTF-8; use --id-type bytes"
        ) from None
    if id_type is IdType.URI and not URI_RE.match(text):
        raise HomeError(f"identity {show_identity(identity)} is not a URI (scheme:...)")
    if id_type is IdType.NAI and (not text.isprintable() or any(c.isspace() for c in text)):
        raise HomeError(f"identity {show_identity(identity)} is not a valid NAI")


def guess_id_type(identity: bytes) -> IdType:
    """URI if it starts with a scheme, else NAI if it is printable UTF-8, else byte string."""
    try:
        text = identity.decode("utf-8")
    except UnicodeDecodeError:
        return IdType.BYTES
    if URI_RE.match(text):
        return IdType.URI
    if text.isprintable() and not any(c.isspace() for c in text):
        return IdType.NAI
    return IdType.BYTES


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
        ks = self.keystore()
        created: str | None = None
        try:
            with self.registry.transaction():
                label = psk_label(identity)
                endpoint = self.registry.add_endpoint(identity, id_type, label)
                self._create(label, lambda: ks.import_secret(label, psk))
                created = label  # from here on only the COMMIT can still fail
        except BaseException:
            self._undo_create(ks, created)
            raise
        return endpoint

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
        ks = self.keystore()
        created: str | None = None
        try:
            with self.registry.transaction():
                label = peer_label(kms_id)
                peer = self.registry.add_peer(
                    kms_id, address, auth, key_label=label, cert_pem=cert_pem, ca_pem=ca_pem,
                    resolve_for=resolve_for, rate_limit=rate_limit, deadline_ms=deadline_ms,
                )  # fmt: skip
                self._create(label, lambda: ks.import_secret(label, psk))
                created = label
        except BaseException:
            self._undo_create(ks, created)
            raise
        return peer

    def remove_peer(self, kms_id: bytes) -> Peer:
        """Unregister a peer KMS and destroy the key shared with it."""
        peer = self.registry.get_peer(kms_id)  # UnknownPeer before the token is opened
        if peer.key_label is None:
            return self.registry.remove_peer(kms_id)
        ks = self.keystore()
        with self.registry.transaction():
            peer = self.registry.remove_peer(kms_id)
            if peer.key_label is not None:
                with contextlib.suppress(KeyNotFound):
                    ks.delete(peer.key_label)
        return peer

    # --- TPK ----------------------------------------------------------------------------
    def rotate_tpk(self) -> TpkVersion:
        """Create a new TPK version and make it current; the old current one stays active."""
        ks = self.keystore()
        created: str | None = None
        try:
            with self.registry.transaction():  # write lock: concurrent rotations serialise
                version = self.registry.next_tpk_version()
                label = tpk_label(version)
                tpk = self.registry.add_tpk_version(version, label, TpkState.CURRENT)
                self._create(label, lambda: ks.generate_secret(label, TPK_BYTES))
                created = label
        except BaseException:
            self._undo_create(ks, created)
            raise
        return tpk

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
        owners[ENVELOPE_LABEL] = "KMS envelope key (PKE)"
        owners[SIGNING_LABEL] = "KMS signing key (SIGNkms)"
        return owners

    def key_inventory(self) -> list[KeyEntry]:
        """Token objects joined with what the registry says they are; never values."""
        owners = self.key_owners()
        infos = {k.label: k for k in self.keystore().list_keys()}
        labels = sorted(set(infos) | set(owners))
        retired = {t.key_label for t in self.registry.tpk_versions() if t.state is TpkState.RETIRED}
        return [
            KeyEntry(label, infos.get(label), owners.get(label))
            for label in labels
            if label in infos or label not in retired  # a retired TPK has no object: fine
        ]

    def delete_orphan(self, label: str) -> None:
        """Destroy a token object that nothing in the registry refers to."""
        if label in self.key_owners():
            raise HomeError(f"{label} is in use ({self.key_owners()[label]}); not an orphan")
        self.keystore().delete(label)

    # --- helpers --------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------
# opening and initialising


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


def _write_secret_file(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 (never overwrite: O_EXCL) and write ``text``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


class _InitUndo:
    """What init created so far, persisted in the marker file so that a re-run after a
    crash (kill -9, power loss) can remove it too."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.files: list[str] = []  # relative to home; files or dirs we created
        self.labels: list[str] = []  # token objects we created
        self.token: dict[str, str | None] = {}

    def save(self) -> None:
        tmp = self.home / (INIT_MARKER + ".tmp")
        tmp.write_text(
            json.dumps({"files": self.files, "labels": self.labels, "token": self.token}),
            encoding="utf-8",
        )
        os.replace(tmp, self.home / INIT_MARKER)

    def add_file(self, rel: str) -> None:
        self.files.append(rel)
        self.save()

    def add_label(self, label: str) -> None:
        self.labels.append(label)
        self.save()

    def undo(self, keystore: KeyStore | None) -> None:
        if keystore is not None:
            for label in reversed(self.labels):
                with contextlib.suppress(Exception):
                    keystore.delete(label)
        for rel in reversed(self.files):
            _remove(self.home / rel)
        for suffix in ("-wal", "-shm", "-journal"):
            _remove(self.home / (REGISTRY_FILE + suffix))
        _remove(self.home / (INIT_MARKER + ".tmp"))
        _remove(self.home / INIT_MARKER)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _recover_interrupted_init(home: Path, token: dict[str, str | None]) -> None:
    """Remove what an interrupted init left (listed in its marker)."""
    try:
        data = json.loads((home / INIT_MARKER).read_text(encoding="utf-8"))
        files = [str(f) for f in data.get("files", [])]
        labels = [str(lbl) for lbl in data.get("labels", [])]
        old_token = dict(data.get("token", {}))
    except (OSError, ValueError, TypeError, AttributeError):
        raise HomeError(
            f"{home / INIT_MARKER} is unreadable; remove the leftovers of the interrupted "
            "init by hand"
        ) from None
    undo = _InitUndo(home)
    undo.files = files
    keystore: KeyStore | None = None
    if labels and old_token.get("softhsm_conf") is None:
        # Keys were created in an external token: clean them up only in that same token.
        if {k: old_token.get(k) for k in ("module", "label", "serial")} != {
            k: token.get(k) for k in ("module", "label", "serial")
        }:
            raise HomeError(
                f"an interrupted init left keys {', '.join(labels)} in token "
                f"{old_token.get('label')!r}; re-run init with the same token or remove them "
                f"and {home / INIT_MARKER} by hand"
            )
        undo.labels = labels
        try:
            keystore = hsm.open_keystore(
                hsm.TokenConfig(
                    module=str(old_token["module"]),
                    token_label=old_token.get("label"),
                    token_serial=old_token.get("serial"),
                    pin=hsm.read_pin(old_token.get("pin_env"), old_token.get("pin_file")),
                )
            )
        except KeyStoreError as exc:
            raise HomeError(f"cannot clean up the interrupted init: {exc}") from None
    try:
        undo.undo(keystore)
    finally:
        if keystore is not None:
            keystore.close()


def init_home(
    home: Path,
    kms_id: str,
    *,
    module: str | None = None,
    token_label: str | None = None,
    token_serial: str | None = None,
    pin_env: str | None = None,
    pin_file: Path | None = None,
    progress: Callable[[str], None] | None = None,
    token_uri: str | None = None,
) -> Home:
    """Initialise a KMS home and return it opened.

    Without ``module`` an embedded SoftHSM2 token is created under ``<home>/token`` with
    random PINs. With ``module`` the token must exist (found by ``token_label`` or
    ``token_serial``) and the PIN comes from ``pin_env`` or ``pin_file``.

    Creates TPK version 1, the envelope and signing RSA keys and their self-signed
    certificates, the registry, and finally kms.toml. On failure everything created is
    removed again; if the process dies half-way, the marker file lets the next init clean up.
    """
    say = progress or (lambda _msg: None)
    home = home.absolute()
    if (home / CONFIG_FILE).exists():
        raise HomeExists(f"KMS home {home} is already initialised ({CONFIG_FILE} exists)")
    embedded = module is None
    if embedded and (token_label or token_serial or pin_env or pin_file):
        raise HomeError("--token-label/--token-serial/--pin-env/--pin-file need --module")
    if not embedded:
        if token_label is None and token_serial is None:
            raise HomeError("--module needs --token-label or --token-serial")
        if (pin_env is None) == (pin_file is None):
            raise HomeError("--module needs exactly one of --pin-env or --pin-file")
    if embedded:
        token_label = EMBEDDED_TOKEN_LABEL
        module = hsm.provision.DEFAULT_SOFTHSM_MODULE
    assert module is not None

    # Validate kms_id and the token settings before anything is created: the exact text that
    # will be written is parsed now.
    pin_file_text = (
        PIN_FILE if embedded else (None if pin_file is None else str(pin_file.absolute()))
    )
    text = render_config(
        kms_id,
        module=module,
        token_label=token_label,
        token_serial=token_serial,
        pin_env=pin_env,
        pin_file=pin_file_text,
        softhsm_conf=SOFTHSM_CONF if embedded else None,
        token_uri=token_uri,
    )
    try:
        config = parse_config(text, home)
    except ConfigError as exc:
        raise HomeError(str(exc).replace(f"{CONFIG_FILE}: [kms] id", "--kms-id")) from None

    token_ident: dict[str, str | None] = {
        "module": module,
        "label": token_label,
        "serial": token_serial,
        "pin_env": pin_env,
        "pin_file": pin_file_text if not embedded else None,
        "softhsm_conf": SOFTHSM_CONF if embedded else None,
    }
    if (home / INIT_MARKER).exists():
        say("cleaning up an interrupted init")
        _recover_interrupted_init(home, token_ident)
    for leftover in (REGISTRY_FILE, TOKEN_DIR, CERT_FILE, SIGNING_CERT_FILE):
        if (home / leftover).exists():
            raise HomeError(
                f"{home / leftover} exists but {CONFIG_FILE} does not; refusing to overwrite it"
            )

    created_home = not home.exists()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    undo = _InitUndo(home)
    undo.token = token_ident
    undo.save()
    registry: Registry | None = None
    h: Home | None = None
    try:
        if embedded:
            say("creating the SoftHSM2 token")
            undo.add_file(TOKEN_DIR)
            (home / TOKEN_DIR).mkdir(mode=0o700)
            user_pin = secrets.token_urlsafe(24)
            so_pin = secrets.token_urlsafe(24)
            _write_secret_file(home / PIN_FILE, user_pin + "\n")
            _write_secret_file(home / SO_PIN_FILE, so_pin + "\n")
            hsm.provision.create_softhsm_token(
                home / TOKEN_DIR, EMBEDDED_TOKEN_LABEL, so_pin, user_pin
            )
            del user_pin, so_pin

        undo.add_file(REGISTRY_FILE)
        registry = Registry.open(home / REGISTRY_FILE, create=True)
        h = Home(home, config, registry)
        ks = h.keystore()

        say("generating TPK version 1")
        for label in (tpk_label(1), ENVELOPE_LABEL, SIGNING_LABEL):
            try:
                ks.key_info(label)
            except KeyNotFound:
                continue
            raise HomeError(f"the token already holds {label} (used by another KMS home?)")
        ks.generate_secret(tpk_label(1), TPK_BYTES)
        undo.add_label(tpk_label(1))
        registry.add_tpk_version(1, tpk_label(1), TpkState.CURRENT)

        say(f"generating the RSA-{RSA_BITS} envelope key")
        ks.generate_rsa(ENVELOPE_LABEL, RSA_BITS)
        undo.add_label(ENVELOPE_LABEL)
        say(f"generating the RSA-{RSA_BITS} signing key")
        ks.generate_rsa(SIGNING_LABEL, RSA_BITS)
        undo.add_label(SIGNING_LABEL)

        for label, rel, usage in (
            (ENVELOPE_LABEL, CERT_FILE, "key_encipherment"),
            (SIGNING_LABEL, SIGNING_CERT_FILE, "digital_signature"),
        ):
            der = certs.build_self_signed_cert(ks, KeyRef(label), kms_id, usage=usage)
            undo.add_file(rel)
            (home / rel).write_bytes(certs.to_pem(der))

        # kms.toml last, without ever replacing one: link() fails if another init won.
        tmp = home / (CONFIG_FILE + ".tmp")
        undo.add_file(CONFIG_FILE + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, home / CONFIG_FILE)
        except FileExistsError:
            raise HomeExists(f"KMS home {home} was initialised concurrently") from None
        tmp.unlink()
        (home / INIT_MARKER).unlink()
    except BaseException as exc:
        ks_for_undo = h._keystore if h is not None else None
        undo.undo(ks_for_undo)
        if h is not None:
            h.close()
        elif registry is not None:
            registry.close()
        if created_home:
            with contextlib.suppress(OSError):
                home.rmdir()
        if isinstance(exc, (RegistryError, KeyStoreError, OSError)) and not isinstance(
            exc, HomeError
        ):
            raise HomeError(f"init failed: {_one_line(exc)}") from None
        raise
    assert h is not None
    return h


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return re.sub(r"\s+", " ", text).strip()


__all__ = [
    "CERT_FILE",
    "ENVELOPE_LABEL",
    "SIGNING_CERT_FILE",
    "SIGNING_LABEL",
    "Home",
    "HomeError",
    "HomeExists",
    "HomeNotInitialised",
    "KeyEntry",
    "guess_id_type",
    "init_home",
    "open_home",
    "peer_label",
    "psk_label",
    "tpk_label",
    "validate_identity",
]
