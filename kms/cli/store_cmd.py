"""``kms store``: where the KMS keeps its shared state (kms.toml ``[store]``).

``kms store migrate DSN`` moves a single-host home (SQLite) into PostgreSQL, the first step
of cluster mode (docs/cluster.md): the registry and the live replay-cache and resolve-ledger
entries go into the database in one transaction, then the home's kms.toml is switched to it.
Stop `kms serve` first. Safe to run twice. The DSN never carries a password: give
--password-env or --password-file (recorded in kms.toml by name/path, never the value), or
use libpq's PGPASSFILE.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kms.cli.admin import _errors_to_cli
from kms.cli.errors import CliError


@_errors_to_cli
def cmd_store_migrate(args: argparse.Namespace) -> int:
    from kms.server.store_migrate import MigrateError, migrate_home
    from kms.store.pg import show_dsn

    if args.password_env is not None and args.password_file is not None:
        raise CliError("give either --password-env or --password-file, not both")
    try:
        moved = migrate_home(
            Path(args.home),
            args.dsn,
            password_env=args.password_env,
            password_file=args.password_file,
            say=lambda m: print(f"kms store migrate: {m}", file=sys.stderr),
        )
    except MigrateError as exc:
        raise CliError(f"store migrate: {exc}") from None
    where = show_dsn(args.dsn)
    if moved.already_there and moved.endpoints == 0 and moved.tpk_versions == 0:
        print(f"nothing to do: {Path(args.home).absolute()} already uses {where}")
        return 0
    note = " (the database already held this registry)" if moved.already_there else ""
    print(f"moved {moved.describe()} to {where}{note}")
    print(f"{Path(args.home).absolute() / 'kms.toml'} now uses [store] backend = \"postgresql\"")
    return 0


@_errors_to_cli
def cmd_store_replica(args: argparse.Namespace) -> int:
    from kms.server.replica import ReplicaError, make_replica_home

    try:
        dst = make_replica_home(Path(args.source), Path(args.home), args.listen)
    except ReplicaError as exc:
        raise CliError(f"store replica: {exc}") from None
    print(f"{dst} is a replica of {Path(args.source).absolute()} (same token, same database)")
    return 0


def register(sub: Any) -> None:  # argparse._SubParsersAction
    p = sub.add_parser(
        "store",
        help="the shared-state store (SQLite or PostgreSQL)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ssub = p.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)
    q = ssub.add_parser(
        "migrate",
        help="move this home's registry and state into PostgreSQL and switch to it",
        description=(
            "Move the home's registry (endpoints, groups, applications, peers, TPK versions)\n"
            "and its live replay-cache and resolve-ledger entries into the PostgreSQL\n"
            "database DSN, all or nothing, then set [store] backend = \"postgresql\" in\n"
            "kms.toml. Stop `kms serve` first. Safe to run twice.\n\n"
            "DSN example: postgresql://kms@db1:5432,db2:5432/kms?target_session_attrs=read-write"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("dsn", metavar="DSN", help="PostgreSQL connection URI (no password in it)")
    q.add_argument("--password-env", metavar="VAR",
                   help="environment variable holding the database password")
    q.add_argument("--password-file", metavar="FILE", type=Path,
                   help="file holding the database password")
    q.set_defaults(func=cmd_store_migrate)
    q = ssub.add_parser(
        "replica",
        help="make --home a replica of a cluster home (copy of its kms.toml and certificates)",
        description=(
            "Make --home a replica of SOURCE (a home already on PostgreSQL): a copy of its\n"
            "kms.toml and certificates with every relative path made absolute (they keep\n"
            "naming SOURCE's PIN file and token configuration) and, with --listen, its own\n"
            "listen address. No init and no key copy: every replica opens the same token and\n"
            "the same database."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("source", metavar="SOURCE", help="the first (or any) replica's home")
    q.add_argument("--listen", metavar="HOST:PORT", help="this replica's listen address")
    q.set_defaults(func=cmd_store_replica)
