"""`kms backup create | verify | restore` on a real home (SoftHSM2 token, SQLite registry):
a round trip keeps every registry row and token object, and a damaged, crafted or misplaced
archive is refused with one line and changes nothing."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sqlite3
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kms.home.backup import MANIFEST, BackupError, create_backup

PSK = "ab" * 16


def _members(archive: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    with tarfile.open(archive) as tar:
        data = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    return json.loads(data.pop(MANIFEST)), data


def _write(archive: Path, manifest: dict[str, Any], files: dict[str, bytes],
           extra: Callable[[tarfile.TarFile], None] | None = None) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in [(MANIFEST, json.dumps(manifest).encode()), *files.items()]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(tar)


def test_round_trip_keeps_every_row_and_key(
    home: Path, tmp_path: Path, kms: Any, registry_rows: Callable[[Path], Any]
) -> None:
    kms(home, "endpoint", "add", "sip:alice@example.org", "--psk-hex", PSK)
    archive = tmp_path / "b.tar.gz"
    kms(home, "backup", "create", str(archive))
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600  # it holds the token and its PIN
    out = kms(home, "backup", "verify", str(archive), "--labels").stdout
    assert "intact" in out
    labels = out.splitlines()[1:]
    assert "kms/envelope-rsa" in labels and any(lb.startswith("psk/") for lb in labels)
    restored = tmp_path / "restored"
    kms(restored, "backup", "restore", str(archive))
    assert registry_rows(restored) == registry_rows(home)
    keys = json.loads(kms(restored, "keys", "list", "--json").stdout)
    assert keys == json.loads(kms(home, "keys", "list", "--json").stdout)
    assert all(k["present"] and k["sensitive"] and not k["extractable"] for k in keys)
    conf = (restored / "token" / "softhsm2.conf").read_text()
    assert f"directories.tokendir = {restored / 'token' / 'tokens'}" in conf
    assert stat.S_IMODE((restored / "token" / "pin").stat().st_mode) == 0o600


def test_provisioning_waits_while_the_backup_reads(home: Path, tmp_path: Path) -> None:
    """The registry's write lock is held while the token folder and databases are read: a
    provisioning command (which takes the same lock first) cannot be half-way."""
    seen: list[str] = []

    def try_to_write() -> None:
        conn = sqlite3.connect(home / "registry.sqlite3", timeout=0)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            seen.append(str(exc))
        finally:
            conn.close()

    create_backup(home, tmp_path / "b.tar.gz", while_locked=try_to_write)
    assert seen == ["database is locked"]
    conn = sqlite3.connect(home / "registry.sqlite3", timeout=0)
    conn.execute("BEGIN IMMEDIATE")  # released afterwards
    conn.close()


def test_refuses_to_overwrite_and_to_restore_over_a_home(
    home: Path, tmp_path: Path, kms: Any, kms_fails: Any
) -> None:
    archive = tmp_path / "b.tar.gz"
    archive.write_bytes(b"keep me")
    kms_fails(home, "backup", "create", str(archive), match="exists; refusing to overwrite")
    assert archive.read_bytes() == b"keep me"
    archive.unlink()
    kms(home, "backup", "create", str(archive))
    kms_fails(home, "backup", "restore", str(archive), match="is not empty")


def test_a_changed_file_is_caught(home: Path, tmp_path: Path, kms: Any, kms_fails: Any) -> None:
    archive = tmp_path / "b.tar.gz"
    kms(home, "backup", "create", str(archive))
    manifest, files = _members(archive)
    files["kms.toml"] += b"\n# edited\n"
    _write(archive, manifest, files)
    kms_fails(home, "backup", "verify", str(archive), match="kms.toml does not match its SHA-256")
    kms_fails(home, "backup", "restore", str(archive), match="SHA-256")


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "token/../../evil"])
def test_paths_outside_the_home_are_refused(
    home: Path, tmp_path: Path, kms: Any, kms_fails: Any, name: str
) -> None:
    archive = tmp_path / "b.tar.gz"
    kms(home, "backup", "create", str(archive))
    manifest, files = _members(archive)
    files[name] = b"x"
    manifest["files"][name] = hashlib.sha256(b"x").hexdigest()
    _write(archive, manifest, files)
    target = tmp_path / "restored"
    kms_fails(target, "backup", "restore", str(archive), match="not a plain relative path")
    assert not target.exists() and not (tmp_path / "evil").exists()


def test_links_are_refused(home: Path, tmp_path: Path, kms: Any, kms_fails: Any) -> None:
    archive = tmp_path / "b.tar.gz"
    kms(home, "backup", "create", str(archive))
    manifest, files = _members(archive)

    def link(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("token/pin2")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)

    _write(archive, manifest, files, link)
    kms_fails(home, "backup", "verify", str(archive), match="not a regular file")


def test_not_an_archive(home: Path, tmp_path: Path, kms_fails: Any) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    kms_fails(home, "backup", "verify", str(junk), match="not a readable backup")


def test_restore_checks_the_token_holds_the_registry_keys(
    home: Path, tmp_path: Path, kms: Any, kms_fails: Any
) -> None:
    """A manifest proves integrity, not completeness of a crafted archive: restore still
    checks the token holds every key the registry names."""
    first = tmp_path / "a.tar.gz"
    kms(home, "backup", "create", str(first))
    kms(home, "endpoint", "add", "sip:alice@example.org", "--psk-hex", PSK)
    archive = tmp_path / "b.tar.gz"
    kms(home, "backup", "create", str(archive))
    manifest, files = _members(archive)
    psk_label = next(lb for lb in manifest["token_labels"] if lb.startswith("psk/"))
    # The token object the endpoint add made (SoftHSM2 encrypts labels in its files).
    (victim,) = {n for n in files if n.endswith(".object")} - set(_members(first)[1])
    del files[victim]
    del manifest["files"][victim]
    _write(archive, manifest, files)
    line = kms_fails(tmp_path / "restored", "backup", "restore", str(archive),
                     match=r"token lacks 1 key\(s\)")
    assert psk_label in line


def test_cluster_mode_is_refused(home: Path, tmp_path: Path, kms_fails: Any) -> None:
    toml = home / "kms.toml"
    text = toml.read_text()
    assert not re.search(r"(?m)^\[store\]", text)  # the template leaves the default
    toml.write_text(text + '\n[store]\nbackend = "postgresql"\n'
                    'dsn = "postgresql://kms@127.0.0.1/kms"\n')
    kms_fails(home, "backup", "create", str(tmp_path / "b.tar.gz"), match="cluster mode")
    assert not (tmp_path / "b.tar.gz").exists()


def test_backup_error_is_a_home_error() -> None:
    from kms.home.errors import HomeError

    assert issubclass(BackupError, HomeError)


def test_a_home_without_its_registry_is_refused_and_left_as_it_is(
    home: Path, tmp_path: Path, kms_fails: Any
) -> None:
    (home / "registry.sqlite3").unlink()
    kms_fails(home, "backup", "create", str(tmp_path / "b.tar.gz"), match="cannot be opened")
    assert not (home / "registry.sqlite3").exists()  # not made anew, empty
    assert not (tmp_path / "b.tar.gz").exists()
