"""``kms init``: a new KMS home (token keys, certificates, registry, kms.toml), all or nothing;
an interrupted init is cleaned up by the next one."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import hsm
import hsm.provision
from kms.home.errors import HomeError, HomeExists
from kms.home.home import Home
from kms.home.layout import (
    CERT_FILE,
    EMBEDDED_TOKEN_LABEL,
    ENVELOPE_LABEL,
    FORK_MODIFIER_BYTES,
    FORK_MODIFIER_LABEL,
    INIT_MARKER,
    PIN_FILE,
    RSA_BITS,
    SIGNING_CERT_FILE,
    SIGNING_LABEL,
    SO_PIN_FILE,
    SOFTHSM_CONF,
    TOKEN_DIR,
    TPK_BYTES,
    tpk_label,
)
from kms.keystore import KeyNotFound, KeyRef, KeyStore, KeyStoreError
from kms.server import certs
from kms.server.config import (
    CONFIG_FILE,
    ConfigError,
    parse_config,
    render_config,
)
from kms.store.registry import (
    REGISTRY_FILE,
    Registry,
    RegistryError,
    TpkState,
)


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
        for label in (tpk_label(1), ENVELOPE_LABEL, SIGNING_LABEL, FORK_MODIFIER_LABEL):
            try:
                ks.key_info(label)
            except KeyNotFound:
                continue
            raise HomeError(f"the token already holds {label} (used by another KMS home?)")
        ks.generate_secret(tpk_label(1), TPK_BYTES)
        undo.add_label(tpk_label(1))
        registry.add_tpk_version(1, tpk_label(1), TpkState.CURRENT)

        say("generating the key-forking modifier key")
        ks.generate_secret(FORK_MODIFIER_LABEL, FORK_MODIFIER_BYTES)
        undo.add_label(FORK_MODIFIER_LABEL)

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


