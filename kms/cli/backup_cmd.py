"""``kms backup create | verify | restore``: a consistent archive of a single-host home,
taken while ``kms serve`` keeps serving, checked, and restored into a new folder
(kms.home.backup; docs/operations.md, Backup and restore)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kms.cli.admin import _errors_to_cli
from kms.cli.errors import CliError


def _say(line: str) -> None:
    print(f"kms backup: {line}", file=sys.stderr)


def _describe(manifest: Any) -> str:
    return (f"{len(manifest.files)} files, token {manifest.token}, "
            f"{len(manifest.token_labels)} key labels named by the registry, "
            f"taken {manifest.created} from {manifest.source_home}")


@_errors_to_cli
def cmd_create(args: argparse.Namespace) -> int:
    from kms.home.backup import EMBEDDED, BackupError, create_backup

    try:
        manifest = create_backup(Path(args.home), Path(args.archive))
    except BackupError as exc:
        raise CliError(f"backup: {exc}") from None
    print(f"wrote {Path(args.archive).absolute()}: {_describe(manifest)}")
    if manifest.token == EMBEDDED:
        _say("the archive holds the token and its PIN: encrypt it and keep it off this host")
    else:
        _say(f"the token is not in the archive ({manifest.token}): take the HSM's own "
             "backup now; it must hold the labels `kms backup verify` lists")
    for line in manifest.not_included:
        _say(f"outside the home, not archived: {line}")
    return 0


@_errors_to_cli
def cmd_verify(args: argparse.Namespace) -> int:
    from kms.home.backup import BackupError, read_backup

    try:
        manifest, _ = read_backup(Path(args.archive))
    except BackupError as exc:
        raise CliError(f"backup verify: {exc}") from None
    print(f"{Path(args.archive).absolute()}: intact ({_describe(manifest)})")
    if args.labels:
        for label in manifest.token_labels:
            print(label)
    return 0


@_errors_to_cli
def cmd_restore(args: argparse.Namespace) -> int:
    from kms.home import open_home
    from kms.home.backup import BackupError, restore_backup

    home = Path(args.home).absolute()
    try:
        manifest = restore_backup(Path(args.archive), home)
    except BackupError as exc:
        raise CliError(f"backup restore: {exc}") from None
    print(f"restored {_describe(manifest)} into {home}")
    # The token must hold every key the restored registry names, or tickets and endpoints
    # would fail one by one at call time: check now, by label (never values).
    with open_home(home) as h:
        missing = [e.label for e in h.key_inventory() if e.info is None]
    if missing:
        raise CliError(
            f"backup restore: the token lacks {len(missing)} key(s) the registry names "
            f"(e.g. {missing[0]}); restore the HSM's backup, then run `kms keys list`"
        )
    _say("every key the registry names is in the token; start `kms serve`")
    _say("replay-cache entries newer than the backup are gone: a message from the last "
         "[policy] timestamp_window_s before the backup could be accepted once more")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "backup",
        help="consistent archive of this home (while serving), verify, restore",
        description=(
            "Archive a single-host home (SQLite) while `kms serve` keeps serving: the registry\n"
            "write lock is held while the token folder and databases are read, so the\n"
            "archive is consistent with any provisioning command. Cluster mode (PostgreSQL)\n"
            "is refused: use pg_dump and the HSM's backup (docs/operations.md)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bsub = p.add_subparsers(dest="backup_command", metavar="COMMAND", required=True)
    q = bsub.add_parser(
        "create",
        help="write ARCHIVE (tar.gz, mode 0600) from this home",
        description=(
            "Write ARCHIVE (a gzip'd tar with MANIFEST.json and a SHA-256 per file) from the\n"
            "home. With the embedded SoftHSM2 token it holds the token and its PIN: encrypt\n"
            "it and keep it off the host. Refuses to overwrite an existing file."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("archive", metavar="ARCHIVE")
    q.set_defaults(func=cmd_create)
    q = bsub.add_parser(
        "verify",
        help="check ARCHIVE (checksums, paths, SQLite integrity) without restoring",
        description="Check ARCHIVE: every file's SHA-256 against MANIFEST.json, safe paths,\n"
                    "and SQLite integrity. Exit 0 if intact.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("archive", metavar="ARCHIVE")
    q.add_argument("--labels", action="store_true",
                   help="also list the token key labels the archived registry names")
    q.set_defaults(func=cmd_verify)
    q = bsub.add_parser(
        "restore",
        help="unpack ARCHIVE into --home (new or empty folder) and check the token",
        description=(
            "Unpack a verified ARCHIVE into the --home folder (which must be new or empty),\n"
            "point the embedded SoftHSM2 configuration at the restored token folder, and\n"
            "check that the token holds every key the registry names."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("archive", metavar="ARCHIVE")
    q.set_defaults(func=cmd_restore)
