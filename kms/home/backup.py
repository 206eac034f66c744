"""``kms backup``: a consistent archive of a single-host home, taken while it serves, and
its restore.

What makes it consistent: every operation that touches both the token and the registry runs
inside a registry write transaction (BEGIN IMMEDIATE; kms.home.home). The backup takes that
same lock first, so no ``endpoint add`` / ``tpk rotate`` / ``peer add`` can be half-way while
the token folder and the registry are read: the archive never names a token object it does not
hold, nor holds one the registry does not name. ``kms serve`` keeps serving throughout: its
calls only read the registry (its revocation pruner waits for the lock). Each SQLite database
is read through the SQLite online-backup API (a snapshot even while the server writes its
WAL), never by copying the live file. One gap: the dummy PSK, which ``kms serve`` makes in
the token on first use without the registry lock; an archive taken at that very moment may
lack it, and the restored KMS makes it again.

The archive is a gzip'd tar with ``MANIFEST.json`` first (what is in it, with a SHA-256 per
file). It holds the embedded token's files and its PIN, so it is as secret as the keys: it is
written mode 0600 and should be encrypted and kept off the host. With an external token (a
hardware HSM) the token is not in the archive: the manifest lists the labels the registry
uses, to check the HSM's own backup against. Cluster mode (PostgreSQL) is refused: its state
is the database's and the HSM's (pg_dump and the HSM backup; docs/operations.md).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import re
import sqlite3
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kms.home.errors import HomeError
from kms.home.layout import KMS_OWN_KEYS, SOFTHSM_CONF, TOKEN_DIR

MANIFEST = "MANIFEST.json"
EMBEDDED = "embedded"  # the manifest's word for a token inside the home
FORMAT = "mikey-kms-backup/1"
REGISTRY_FILE = "registry.sqlite3"
# Never archived: the running server's lock, SQLite's side files (the snapshot replaces them).
SKIPPED = re.compile(r"(^|/)serve\.lock$|\.sqlite3-(wal|shm|journal)$")
# How long the backup waits for an operator command holding the registry's write lock.
LOCK_WAIT_S = 30.0


class BackupError(HomeError):
    """The backup cannot be made, checked or restored; one line."""


@dataclass
class Manifest:
    """What an archive holds: ``files`` maps each archived path (relative to the home) to its
    SHA-256; ``token`` is "embedded" or "external: <module>"; ``token_labels`` the labels the
    registry names (to check an HSM's own backup against)."""

    created: str
    source_home: str
    token: str
    files: dict[str, str] = field(default_factory=dict)
    token_labels: list[str] = field(default_factory=list)
    not_included: list[str] = field(default_factory=list)
    format: str = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise BackupError(f"not a {FORMAT} archive (format {doc.get('format')!r})")
            return cls(**doc)
        except (ValueError, TypeError) as exc:
            raise BackupError(f"{MANIFEST} is not valid: {type(exc).__name__}") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _snapshot_sqlite(path: Path) -> bytes:
    """The database's committed content, read through the online-backup API."""
    with tempfile.TemporaryDirectory(prefix="kms-backup-") as tmp:
        dst_path = Path(tmp) / "db"
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=LOCK_WAIT_S)
        dst = sqlite3.connect(dst_path)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        return dst_path.read_bytes()


@contextlib.contextmanager
def _registry_write_lock(registry: Path) -> Iterator[None]:
    """Hold the registry's write lock (what every provisioning command takes first)."""
    try:  # mode=rw: a missing registry is an error, not a new empty database
        conn = sqlite3.connect(f"file:{registry}?mode=rw", uri=True, timeout=LOCK_WAIT_S,
                               isolation_level=None)
    except sqlite3.OperationalError as exc:
        raise BackupError(f"registry {registry} cannot be opened ({exc})") from None
    try:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise BackupError(
                f"registry {registry} stayed locked for {LOCK_WAIT_S:.0f} s ({exc}); "
                "an operator command is running: try again"
            ) from None
        try:
            yield
        finally:
            conn.execute("ROLLBACK")  # nothing was written: only the lock was wanted
    finally:
        conn.close()


def _home_files(home: Path) -> Iterator[tuple[str, Path]]:
    for root, dirs, files in os.walk(home):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            rel = path.relative_to(home).as_posix()
            if SKIPPED.search(rel):
                continue
            yield rel, path


def create_backup(
    home: Path, archive: Path, *, while_locked: Callable[[], None] | None = None
) -> Manifest:
    """Write ``archive`` (refusing to overwrite one) from the home at ``home``.

    ``while_locked``: called once while the registry's write lock is held (tests use it to
    show that provisioning waits)."""
    from kms.server.config import CONFIG_FILE, ConfigError, load_config

    home = home.absolute()
    try:
        config = load_config(home)
    except ConfigError as exc:
        raise BackupError(str(exc)) from None
    if config.store.backend != "sqlite":
        raise BackupError(
            "cluster mode: the registry and live state are in PostgreSQL; back up with "
            "pg_dump, the HSM's own backup and one replica's kms.toml and certificates "
            "(docs/operations.md, Backup and restore)"
        )
    if archive.exists():
        raise BackupError(f"{archive} exists; refusing to overwrite it")
    embedded = config.token.softhsm_conf == home / SOFTHSM_CONF
    manifest = Manifest(
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        source_home=str(home),
        token=EMBEDDED if embedded else f"external: {config.token.module}",
    )
    for what, where in _outside_paths(config, home):
        manifest.not_included.append(f"{what}: {where}")
    contents: dict[str, tuple[bytes, int]] = {}
    registry = home / REGISTRY_FILE
    with _registry_write_lock(registry):
        if while_locked is not None:
            while_locked()
        for rel, path in _home_files(home):
            if not embedded and rel.startswith(f"{TOKEN_DIR}/"):
                continue
            mode = stat.S_IMODE(path.stat().st_mode)
            data = _snapshot_sqlite(path) if rel.endswith(".sqlite3") else path.read_bytes()
            contents[rel] = (data, mode)
        manifest.token_labels = sorted(_registry_labels(contents[REGISTRY_FILE][0]))
    if CONFIG_FILE not in contents:
        raise BackupError(f"{home / CONFIG_FILE} is missing")
    manifest.files = {rel: _sha256(data) for rel, (data, _) in contents.items()}
    _write_archive(archive, manifest, contents)
    return manifest


def _outside_paths(config: Any, home: Path) -> Iterator[tuple[str, Path]]:
    """Files kms.toml names outside the home (every setting of kind path): not archived, and
    said so rather than silently."""
    from kms.server.settings import SETTINGS, Kind

    for s in SETTINGS:
        path = getattr(getattr(config, s.section), s.key) if s.kind is Kind.PATH else None
        if path is not None and not Path(path).absolute().is_relative_to(home):
            yield f"[{s.section}] {s.key}", Path(path)


def _registry_labels(registry_bytes: bytes) -> set[str]:
    with tempfile.TemporaryDirectory(prefix="kms-backup-") as tmp:
        db = Path(tmp) / "r.sqlite3"
        db.write_bytes(registry_bytes)
        from kms.store.registry import Registry

        with contextlib.closing(Registry.open(db)) as reg:
            return set(reg.key_owners()) | set(KMS_OWN_KEYS)


def _write_archive(
    archive: Path, manifest: Manifest, contents: dict[str, tuple[bytes, int]]
) -> None:
    tmp = archive.with_name(f".{archive.name}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, MANIFEST, manifest.to_json(), 0o600)
            for rel, (data, mode) in sorted(contents.items()):
                _add(tar, rel, data, mode)
            raw.flush()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, archive)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = int(dt.datetime.now(dt.UTC).timestamp())
    tar.addfile(info, io.BytesIO(data))


def read_backup(archive: Path) -> tuple[Manifest, dict[str, tuple[bytes, int]]]:
    """The manifest and files of ``archive``, checked: every member a plain file at a safe
    relative path, listed in the manifest with the right SHA-256, none missing, and every
    SQLite database passing its integrity check."""
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            return _read_members(archive, tar)
    except (OSError, tarfile.TarError, EOFError, zlib.error) as exc:
        raise BackupError(f"{archive}: not a readable backup ({type(exc).__name__})") from None


def _read_members(
    archive: Path, tar: tarfile.TarFile
) -> tuple[Manifest, dict[str, tuple[bytes, int]]]:
    members = tar.getmembers()
    if not members or members[0].name != MANIFEST:
        raise BackupError(f"{archive}: {MANIFEST} is not its first member")
    manifest = Manifest.from_json(_read(tar, members[0]))
    contents: dict[str, tuple[bytes, int]] = {}
    for m in members[1:]:
        _check_member(m)
        if m.name in contents:
            raise BackupError(f"{archive}: {m.name} appears twice")
        contents[m.name] = (_read(tar, m), stat.S_IMODE(m.mode))
    listed, held = set(manifest.files), set(contents)
    if listed != held:
        extra, missing = sorted(held - listed), sorted(listed - held)
        raise BackupError(f"{archive}: members do not match {MANIFEST} "
                          f"(not listed: {extra[:3]}, missing: {missing[:3]})")
    for rel, (data, _) in contents.items():
        if _sha256(data) != manifest.files[rel]:
            raise BackupError(f"{archive}: {rel} does not match its SHA-256 in {MANIFEST}")
        if rel.endswith(".sqlite3"):
            _check_sqlite(rel, data)
    return manifest, contents


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    if f is None:
        raise BackupError(f"{member.name}: not a regular file")
    return f.read()


def _check_member(m: tarfile.TarInfo) -> None:
    p = PurePosixPath(m.name)
    if not m.isreg():
        raise BackupError(f"{m.name}: not a regular file (links and devices are refused)")
    if p.is_absolute() or ".." in p.parts or m.name != p.as_posix() or not m.name:
        raise BackupError(f"{m.name!r}: not a plain relative path")


def _check_sqlite(rel: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="kms-backup-") as tmp:
        db = Path(tmp) / "db"
        db.write_bytes(data)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise BackupError(f"{rel}: not a SQLite database ({exc})") from None
        finally:
            conn.close()
        if verdict != "ok":
            raise BackupError(f"{rel}: SQLite integrity check failed")


def restore_backup(archive: Path, home: Path) -> Manifest:
    """Unpack a checked archive into ``home`` (absent or empty), pointing the embedded
    SoftHSM configuration at the restored token folder."""
    manifest, contents = read_backup(archive)
    home = home.absolute()
    if home.exists() and any(home.iterdir()):
        raise BackupError(f"{home} is not empty; restore into a new or empty folder")
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    for rel, (data, mode) in sorted(contents.items()):
        path = home / rel
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if rel == SOFTHSM_CONF:
            data = _retarget_softhsm_conf(data, home / TOKEN_DIR / "tokens")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o700)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return manifest


def _retarget_softhsm_conf(data: bytes, tokendir: Path) -> bytes:
    text, n = re.subn(r"(?m)^(\s*directories\.tokendir\s*=).*$",
                      lambda m: f"{m.group(1)} {tokendir}", data.decode("utf-8"))
    if n != 1:
        raise BackupError(f"{SOFTHSM_CONF}: expected one directories.tokendir line, found {n}")
    return text.encode("utf-8")
