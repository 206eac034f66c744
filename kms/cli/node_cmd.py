"""``kms node``: authorised intermediate nodes (RFC 6043 11.1: recorders, conference bridges,
transcoders), and ``kms audit nodes``: which nodes obtained which call's keys.

A node asks the KMS for the keys of a call leg it handles with a RESOLVE_INIT_PSK of its own
(IDRpsk names the node, IDRr the leg's Responder; docs/design.md). It authenticates with a
PSK kept in the token like an endpoint's, and obtains keys only for calls in its scope:
initiator and responder identity patterns (shell globs, as `kms peer add --resolve-for`)
and groups. Nothing is in scope by default. ``kms node rotate-psk`` gives a node a new PSK
version next to the old one (IDRpsk ``<node>#psk<N>``) until ``retire-psk`` (kms.cli.psk_cmd,
shared with endpoints). ``kms node remove`` destroys its PSKs: the node is refused from its
next request on. Every key release is audited (``ticket.node_keys``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from kms.cli.admin import _errors_to_cli, _identity, _json_flag, _open, _print_table, _show_time
from kms.cli.errors import CliError
from kms.cli.psk_cmd import add_psk_verbs
from kms.cli.psk_input import generate_psk, psk_file_written, read_psk
from kms.home import Home
from kms.server.compose import AUDIT_LOG
from kms.server.psk_rotation import Owner
from kms.store.audit import JsonLinesAuditSink
from kms.store.nodes import Node, NodeError, NodeRole
from kms.store.registry import show_identity
from kms.store.revocations import RevocationError, parse_ticket_id

NODE_EVENT = "ticket.node_keys"


def _audit(h: Home, record: dict[str, object]) -> None:
    """The operator's action, in the same audit log as the server's records."""
    cfg = h.config
    sink = JsonLinesAuditSink(cfg.home / AUDIT_LOG, cfg.audit.max_bytes, cfg.audit.keep)
    try:
        sink.emit({"time": round(time.time(), 3), "outcome": "ok", "source": "cli", **record})
    finally:
        sink.close()


def _scope(node: Node) -> dict[str, list[str]]:
    return {
        "initiators": list(node.initiators),
        "responders": list(node.responders),
        "groups": list(node.groups),
    }


def _patterns(values: list[str] | None, flag: str) -> tuple[str, ...]:
    out = tuple(values or ())
    if any(not p or "\n" in p for p in out):
        raise CliError(f"{flag} patterns must be non-empty single lines")
    return out


def _node_cert(path: str, identity: bytes) -> str:
    """``--cert``: PEM certificate(s) naming the node as subjectAltName URI, RSA keys."""
    try:
        data = Path(path).read_bytes()
        certs = x509.load_pem_x509_certificates(data)
    except OSError as exc:
        raise CliError(f"--cert {path}: {exc.strerror}") from None
    except ValueError:
        raise CliError(f"--cert {path}: not a PEM certificate") from None
    for cert in certs:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = san.get_values_for_type(x509.UniformResourceIdentifier)
            uris = [u.encode("utf-8") for u in names]
        except x509.ExtensionNotFound:
            uris = []
        if identity not in uris:
            raise CliError(f"--cert: a certificate does not name {show_identity(identity)} as "
                           "subjectAltName URI")  # fmt: skip
        if not isinstance(cert.public_key(), rsa.RSAPublicKey):
            raise CliError("--cert: node certificates must hold RSA keys (RFC 3830 SIGN)")
    return data.decode("ascii")


@_errors_to_cli
def cmd_node_add(args: argparse.Namespace) -> int:
    identity = _identity(args.identity)
    out: Path | None = None
    psk: bytes | None = None
    cert_pem: str | None = None
    if args.cert is not None:
        cert_pem = _node_cert(args.cert, identity)
    elif args.psk_hex is not None or args.psk_file is not None:
        psk = read_psk(args.psk_hex, args.psk_file, "--psk")
    else:
        out = Path(args.generate_psk)
        psk = generate_psk(args.psk_length, out, "--generate-psk")
    scope = {
        "initiators": _patterns(args.initiator, "--initiator"),
        "responders": _patterns(args.responder, "--responder"),
        "groups": _patterns(args.group, "--group"),
    }
    with _open(args) as h:
        if h.registry.find_node(identity) is not None:
            raise CliError(f"node {show_identity(identity)} already exists")
        try:
            with psk_file_written(out, psk or b""):
                node = h.add_node(
                    identity, NodeRole(args.role), psk, initiators=scope["initiators"],
                    responders=scope["responders"], groups=scope["groups"],
                    cert_pem=cert_pem,
                )  # fmt: skip
        except NodeError as exc:
            raise CliError(str(exc)) from None
        _audit(h, {"event": "node.added", "node": show_identity(node.identity),
                   "role": node.role.value, **_scope(node)})  # fmt: skip
        forbidden = h.config.policy.intermediate_nodes == "forbidden"
    how = f"key {node.key_label}" if node.key_label else "pinned certificate"
    print(f"added {node.role.value} node {show_identity(node.identity)}, {how}")
    for what, patterns in _scope(node).items():
        print(f"  {what}: " + (", ".join(patterns) if patterns else "none"))
    if not any(_scope(node).values()):
        print("  nothing is in scope: the node obtains no keys until given a scope")
    if out is not None and psk is not None:
        print(f"new {len(psk)}-byte PSK written to {out} (mode 0600)")
    if forbidden:
        print("  note: [policy] intermediate_nodes = \"forbidden\": nodes are refused")
    return 0


@_errors_to_cli
def cmd_node_remove(args: argparse.Namespace) -> int:
    identity = _identity(args.identity)
    with _open(args) as h:
        try:
            node = h.remove_node(identity)
        except NodeError as exc:
            raise CliError(str(exc)) from None
        _audit(h, {"event": "node.removed", "node": show_identity(node.identity),
                   "role": node.role.value})  # fmt: skip
    what = f"destroyed key {node.key_label}" if node.key_label else "its pinned certificate"
    print(f"removed {node.role.value} node {show_identity(node.identity)} and {what}")
    return 0


def _node_json(n: Node) -> dict[str, Any]:
    return {
        "identity": show_identity(n.identity),
        "role": n.role.value,
        "key_label": n.key_label,
        **_scope(n),
        "created_at": _show_time(n.created_at),
    }


@_errors_to_cli
def cmd_node_list(args: argparse.Namespace) -> int:
    with _open(args) as h:
        nodes = h.registry.list_nodes()
    if args.json:
        print(json.dumps([_node_json(n) for n in nodes], indent=2))
        return 0
    _print_table(
        [
            [show_identity(n.identity), n.role.value, n.key_label or "certificate",
             ",".join(n.initiators) or "-", ",".join(n.responders) or "-",
             ",".join(n.groups) or "-", _show_time(n.created_at)]
            for n in nodes
        ],
        ["NODE", "ROLE", "KEY LABEL", "INITIATORS", "RESPONDERS", "GROUPS", "CREATED"],
    )  # fmt: skip
    return 0


@_errors_to_cli
def cmd_node_show(args: argparse.Namespace) -> int:
    with _open(args) as h:
        try:
            node = h.registry.get_node(_identity(args.identity))
        except NodeError as exc:
            raise CliError(str(exc)) from None
    print(json.dumps(_node_json(node), indent=2))
    return 0


# ------------------------------------------------------------------------------------------
# kms audit nodes


def audit_records(h: Home) -> Iterator[dict[str, Any]]:
    """The audit log's records, oldest first (rotated files ``audit.log.N`` .. ``.1``, then
    ``audit.log``); lines that are not JSON objects are skipped."""
    log = h.config.home / AUDIT_LOG
    rotated = sorted(
        (p for p in log.parent.glob(AUDIT_LOG + ".*") if p.suffix[1:].isdigit()),
        key=lambda p: -int(p.suffix[1:]),
    )
    for path in [*rotated, log]:
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


@_errors_to_cli
def cmd_audit_nodes(args: argparse.Namespace) -> int:
    ticket = None
    if args.ticket is not None:
        try:
            ticket = parse_ticket_id(args.ticket).hex()
        except RevocationError as exc:
            raise CliError(f"--ticket: {exc}") from None
    with _open(args) as h:
        found = []
        for r in audit_records(h):
            if "node" not in r:
                continue
            released = r.get("event") == NODE_EVENT and r.get("outcome") == "ok"
            if not released and not (args.refused and r.get("event") == "refused"):
                continue
            if ticket is not None and r.get("ticket_id") != ticket:
                continue
            if args.node is not None and r.get("node") != args.node:
                continue
            found.append(r)
    if args.json:
        keys = ("time", "node", "role", "ticket_id", "leg", "forking", "scope", "keys",
                "outcome", "error_no", "reason", "correlation_id")  # fmt: skip
        print(json.dumps([{k: r[k] for k in keys if k in r} for r in found], indent=2))
        return 0
    _print_table(
        [
            [_show_time(int(float(str(r.get("time", 0))))), str(r.get("node", "")),
             str(r.get("role", "-")), str(r.get("ticket_id", "-")), str(r.get("leg") or "-"),
             "yes" if r.get("forking") else "no",
             "released" if r.get("outcome") == "ok" else f"refused: {r.get('reason', '')}"]
            for r in found
        ],
        ["TIME", "NODE", "ROLE", "TICKET", "LEG", "FORKING", "RESULT"],
    )  # fmt: skip
    return 0


def register(sub: Any) -> None:  # argparse._SubParsersAction
    """Add ``kms node`` and ``kms audit`` to the ``kms`` parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "node",
        help="manage intermediate nodes (recorders, bridges, transcoders) and their scope",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    nsub = p.add_subparsers(dest="node_command", metavar="SUBCOMMAND", required=True)

    q = nsub.add_parser(
        "add",
        help="register a node, import its PSK and give it a scope",
        formatter_class=fmt,
        description=(
            "Register NODE (the identity its RESOLVE_INIT names in IDRpsk) with a ROLE and a\n"
            "PSK kept in the token (sensitive, non-extractable). The PSK is given once:\n"
            "--psk-hex / --psk-file, or --generate-psk FILE writes a new one there (0600).\n"
            "--cert PEM instead: the node's signing certificate, pinned (it then sends\n"
            "RESOLVE_INIT_PK, CERT = that certificate, SIGN over it || IDRr || IDRkms).\n\n"
            "Scope (nothing by default; repeatable; shell globs as `kms peer add`):\n"
            "  --initiator PATTERN  calls whose ticket names a matching IDRi\n"
            "  --responder PATTERN  legs whose Responder (IDRr) matches\n"
            "  --group PATTERN      calls to a matching group, legs of its members now\n"
            "The node obtains the session keys (TEK, the leg's TGK', GTGK) of calls in scope,\n"
            "never MPKi / MPKr'. [policy] intermediate_nodes = \"forbidden\" refuses all nodes.\n"
            "A running `kms serve` picks the new node up on its first request."
        ),
    )
    q.add_argument("identity", metavar="NODE", help="e.g. sip:recorder@dispatch.example.org")
    q.add_argument("--role", required=True, choices=[r.value for r in NodeRole])
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--psk-hex", metavar="HEX", help="the node's PSK in hexadecimal")
    src.add_argument("--psk-file", metavar="FILE", help="file holding the PSK in hex")
    src.add_argument("--generate-psk", metavar="FILE", help="generate a PSK, write it to FILE")
    src.add_argument(
        "--cert", metavar="PEM",
        help="the node's signing certificate (pinned; RSA, subjectAltName URI = NODE): "
        "it then sends RESOLVE_INIT_PK instead of RESOLVE_INIT_PSK",
    )  # fmt: skip
    q.add_argument("--psk-length", type=int, default=32, metavar="N",
                   help="bytes of a generated PSK (default 32)")  # fmt: skip
    for flag, what in (("--initiator", "initiator identity"), ("--responder", "responder "
                       "identity"), ("--group", "group identity")):  # fmt: skip
        q.add_argument(flag, action="append", metavar="PATTERN", help=f"{what} pattern in scope")
    q.set_defaults(func=cmd_node_add)

    q = nsub.add_parser(
        "remove",
        help="unregister a node and destroy its PSK (refused at once)",
        description="Unregister NODE and destroy its PSK (every version): its next request "
        "is refused.",
    )
    q.add_argument("identity", metavar="NODE")
    q.set_defaults(func=cmd_node_remove)

    q = nsub.add_parser(
        "list",
        help="list nodes with role and scope (never keys)",
        description="List the intermediate nodes with their role and scope.",
    )
    _json_flag(q)
    q.set_defaults(func=cmd_node_list)

    q = nsub.add_parser(
        "show",
        help="show one node (JSON)",
        description="Show NODE: role, key label, scope, creation time (JSON).",
    )
    q.add_argument("identity", metavar="NODE")
    q.set_defaults(func=cmd_node_show)
    # rotate-psk / retire-psk / psk-list, shared with `kms endpoint` (kms.cli.psk_cmd)
    add_psk_verbs(nsub, Owner.NODE)

    p = sub.add_parser(
        "audit",
        help="read the audit log (compliance questions)",
        description="Answer compliance questions from the audit log.",
    )
    asub = p.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    q = asub.add_parser(
        "nodes",
        help="which intermediate nodes obtained which call's keys",
        formatter_class=fmt,
        description=(
            "List the key releases to intermediate nodes (audit event ticket.node_keys):\n"
            "time, node, role, ticket id (as `kms call` and the audit log print it), the leg\n"
            "(IDRr) and whether the ticket forks. Reads audit.log and its rotated files in\n"
            "the home. --refused adds the refused node requests, with their reason."
        ),
    )
    q.add_argument("--ticket", metavar="TICKET_ID", help="only this ticket (32 hex digits)")
    q.add_argument("--node", metavar="NODE", help="only this node")
    q.add_argument("--refused", action="store_true", help="also list refused node requests")
    _json_flag(q)
    q.set_defaults(func=cmd_audit_nodes)


__all__ = ["audit_records", "register"]
