"""``kms app``: the applications (IDRapp, RFC 6043 6.10) tickets may be issued for.

With none registered, every application is authorised (a ticket without IDRapp). Once some
are, a desired TP naming others is trimmed to the registered ones (flag K), or refused with
Invalid ID when none of its applications is registered.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from kms.cli.admin import _errors_to_cli, _identity, _json_flag, _open, _print_table, _show_time
from kms.store.registry import show_identity


@_errors_to_cli
def cmd_app_add(args: argparse.Namespace) -> int:
    with _open(args) as h:
        h.registry.add_application(_identity(args.identity))
    print(f"authorised application {args.identity}")
    return 0


@_errors_to_cli
def cmd_app_remove(args: argparse.Namespace) -> int:
    with _open(args) as h:
        h.registry.remove_application(_identity(args.identity))
    print(f"removed application {args.identity}")
    return 0


@_errors_to_cli
def cmd_app_list(args: argparse.Namespace) -> int:
    with _open(args) as h:
        apps = h.registry.list_applications()
    if args.json:
        print(
            json.dumps(
                [{"identity": show_identity(a.identity), "created_at": a.created_at} for a in apps],
                indent=2,
            )
        )
    elif not apps:
        print("no applications registered: every application is authorised")
    else:
        _print_table(
            [[show_identity(a.identity), _show_time(a.created_at)] for a in apps],
            ["APPLICATION", "ADDED"],
        )
    return 0


def register(sub: Any) -> None:  # argparse._SubParsersAction
    p = sub.add_parser(
        "app",
        help="authorise applications (IDRapp) tickets may be issued for",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    asub = p.add_subparsers(dest="app_command", metavar="SUBCOMMAND", required=True)
    q = asub.add_parser(
        "add",
        help="authorise an application identity",
        description="Authorise IDENTITY as an IDRapp for new tickets.",
    )
    q.add_argument("identity", metavar="IDENTITY")
    q.set_defaults(func=cmd_app_add)
    q = asub.add_parser(
        "remove",
        help="withdraw an application identity",
        description="Stop issuing tickets for application IDENTITY.",
    )
    q.add_argument("identity", metavar="IDENTITY")
    q.set_defaults(func=cmd_app_remove)
    q = asub.add_parser(
        "list",
        help="list authorised applications",
        description="List the authorised application identities.",
    )
    _json_flag(q)
    q.set_defaults(func=cmd_app_list)
