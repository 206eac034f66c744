"""``kms revoke``: stop a lost device or a leaked ticket now, not when its ticket expires.

  suspend IDENTITY      refuse the endpoint as Initiator and Responder, and refuse every
                        ticket it requested, until ``resume``
  resume IDENTITY       lift a suspension
  ticket TICKET_ID      revoke one ticket (the id ``kms call`` and the audit log print)
  requested-before IDENTITY [--before TIME]
                        revoke every ticket IDENTITY requested before TIME (default: now)
  list                  what is revoked now

Revocations live in the registry (SQLite, or PostgreSQL in cluster mode), so every replica
enforces them on its next request; a peer KMS asking to resolve a revoked ticket is refused
by this KMS, the issuer. Each change is written to the audit log (``revocation.*`` events);
refusals are audited by the server with the reason. Ticket revocations are final.

Pruning: a ticket revocation is deleted once no ticket it could match can still be valid,
2 x [policy] max_lifetime_s + timestamp_window_s + 1 s after it was made (the server prunes
in the background; ``list`` prunes first, so it never shows such rows). Suspensions and
requested-before times are kept until lifted or replaced.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import time
from typing import Any

from kms.cli.admin import _errors_to_cli, _identity, _json_flag, _open, _show_time, print_listing
from kms.cli.errors import CliError
from kms.home import Home
from kms.server.compose import AUDIT_LOG
from kms.server.stores import revocation_horizon
from kms.store.audit import JsonLinesAuditSink
from kms.store.registry import show_identity
from kms.store.revocations import RevocationError, RevocationKind, parse_ticket_id


def _audit(h: Home, record: dict[str, object]) -> None:
    """The operator's action, in the same audit log as the server's records."""
    cfg = h.config
    sink = JsonLinesAuditSink(cfg.home / AUDIT_LOG, cfg.audit.max_bytes, cfg.audit.keep)
    try:
        sink.emit({"time": round(time.time(), 3), "outcome": "ok", "source": "cli", **record})
    finally:
        sink.close()


def parse_time(text: str) -> int:
    """``now``, Unix seconds, or an ISO 8601 time (UTC unless it names an offset). Times are
    whole seconds; ``now`` rounds up, so a ticket issued before the command is covered."""
    t = text.strip()
    if t == "now":
        return math.ceil(time.time())
    if t.isdigit():
        return int(t)
    try:
        when = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(
            f"cannot read time {text!r}: use now, Unix seconds or ISO 8601 "
            "(e.g. 2026-01-31T12:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp())


@_errors_to_cli
def cmd_suspend(args: argparse.Namespace) -> int:
    identity = _identity(args.identity)
    with _open(args) as h:
        h.registry.get_endpoint(identity)  # UnknownIdentity: only endpoints are suspended
        try:
            entry = h.registry.suspend(identity, args.reason)
        except RevocationError as exc:
            raise CliError(str(exc)) from None
        _audit(h, {"event": "revocation.suspend", "identity": show_identity(identity),
                   "reason": entry.reason})
    print(f"suspended endpoint {show_identity(identity)} since {_show_time(entry.created_at)}")
    return 0


@_errors_to_cli
def cmd_resume(args: argparse.Namespace) -> int:
    identity = _identity(args.identity)
    with _open(args) as h:
        if not h.registry.resume(identity):
            raise CliError(f"endpoint {show_identity(identity)} is not suspended")
        _audit(h, {"event": "revocation.resume", "identity": show_identity(identity)})
    print(f"resumed endpoint {show_identity(identity)}")
    return 0


@_errors_to_cli
def cmd_ticket(args: argparse.Namespace) -> int:
    try:
        tid = parse_ticket_id(args.ticket_id)
    except RevocationError as exc:
        raise CliError(str(exc)) from None
    with _open(args) as h:
        try:
            entry = h.registry.revoke_ticket(tid, args.reason)
        except RevocationError as exc:
            raise CliError(str(exc)) from None
        _audit(h, {"event": "revocation.ticket", "ticket_id": tid.hex(), "reason": entry.reason})
    print(f"revoked ticket {tid.hex()}")
    return 0


@_errors_to_cli
def cmd_requested_before(args: argparse.Namespace) -> int:
    identity = _identity(args.identity)
    before = parse_time(args.before)
    with _open(args) as h:
        h.registry.get_endpoint(identity)
        try:
            entry = h.registry.revoke_requested_before(identity, before, args.reason)
        except RevocationError as exc:
            raise CliError(str(exc)) from None
        _audit(h, {"event": "revocation.requested_before", "identity": show_identity(identity),
                   "before": entry.not_before, "reason": entry.reason})
    print(f"revoked every ticket {show_identity(identity)} requested before "
          f"{_show_time(entry.not_before)}")
    return 0


def _subject(kind: RevocationKind, subject: bytes) -> str:
    return subject.hex() if kind is RevocationKind.TICKET else show_identity(subject)


@_errors_to_cli
def cmd_list(args: argparse.Namespace) -> int:
    with _open(args) as h:
        h.registry.prune_ticket_revocations(time.time(), revocation_horizon(h.config))
        entries = h.registry.list_revocations()
    records = [
        {
            "kind": e.kind.value,
            "subject": _subject(e.kind, e.subject),
            "before": _show_time(e.not_before) if e.kind is RevocationKind.REQUESTED_BEFORE
            else None,
            "since": _show_time(e.created_at),
            "reason": e.reason,
        }
        for e in entries
    ]
    print_listing(args.json, records, [
        ("KIND", "kind"), ("SUBJECT", "subject"), ("BEFORE", "before"), ("SINCE", "since"),
        ("REASON", "reason"),
    ], empty="nothing is revoked")  # fmt: skip
    return 0


def register(sub: Any) -> None:  # argparse._SubParsersAction
    p = sub.add_parser(
        "revoke",
        help="suspend endpoints and revoke tickets, effective at once",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rsub = p.add_subparsers(dest="revoke_command", metavar="SUBCOMMAND", required=True)

    def reason(q: argparse.ArgumentParser) -> None:
        q.add_argument("--reason", default="", help="one line for the audit log and list")

    q = rsub.add_parser(
        "suspend",
        help="suspend an endpoint (refused as Initiator and Responder, its tickets refused)",
        description=(
            "Suspend endpoint IDENTITY: its REQUEST_INIT and RESOLVE_INIT are refused (Invalid\n"
            "ID) and no ticket it requested is resolved for anyone (Invalid ticket), until\n"
            "`kms revoke resume`. Its PSK stays in the token."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("identity", metavar="IDENTITY")
    reason(q)
    q.set_defaults(func=cmd_suspend)
    q = rsub.add_parser(
        "resume",
        help="lift an endpoint's suspension",
        description="Lift the suspension of endpoint IDENTITY.",
    )
    q.add_argument("identity", metavar="IDENTITY")
    q.set_defaults(func=cmd_resume)
    q = rsub.add_parser(
        "ticket",
        help="revoke one ticket by id",
        description=(
            "Revoke the ticket TICKET_ID (32 hex digits, as `kms call` and the audit log\n"
            "print it). Final: every later Ticket Resolve of it\n"
            "is refused with Invalid ticket, here and for peer KMSs."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("ticket_id", metavar="TICKET_ID")
    reason(q)
    q.set_defaults(func=cmd_ticket)
    q = rsub.add_parser(
        "requested-before",
        help="revoke every ticket an endpoint requested before a time",
        description=(
            "Revoke every ticket IDENTITY requested (base-ticket timestamp) before TIME.\n"
            "The time only moves forward; tickets requested afterwards work."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("identity", metavar="IDENTITY")
    q.add_argument("--before", default="now", metavar="TIME",
                   help="now (default), Unix seconds, or ISO 8601 such as 2026-01-31T12:00:00Z")
    reason(q)
    q.set_defaults(func=cmd_requested_before)
    q = rsub.add_parser(
        "list",
        help="list suspensions and revocations",
        description=(
            "List suspended endpoints and revoked tickets. Ticket revocations older than\n"
            "2 x [policy] max_lifetime_s + timestamp_window_s + 1 s are pruned first: every\n"
            "ticket they could match has expired (suspensions and requested-before times\n"
            "are kept)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _json_flag(q)
    q.set_defaults(func=cmd_list)
