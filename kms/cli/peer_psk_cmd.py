"""``kms peer set | rotate-psk | use-psk | retire-psk | psk-list``: change a peer KMS's
settings, and rotate the key shared with it, while both KMSs serve (RFC 6043 9).

The versions of a peer's shared key work like an endpoint's PSK versions (kms.cli.psk_cmd,
RFC 6043 4.2.3: IDRpsk "used to indicate the pre-shared key used"): ``rotate-psk`` imports
version N+1 into the token, accepted from the peer at once (its RESOLVE_INIT_PSK naming it
``<peer id>#psk<N>``); ``use-psk`` switches the version THIS KMS sends with (``<our id>#psk<N>``;
version 1 is the bare id, so a peer that never rotated keeps working); ``retire-psk``
destroys a version (never the one we send with). Procedure: docs/federation.md.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from kms.cli.admin import _errors_to_cli, _json_flag, _open, _show_time, print_listing
from kms.cli.errors import CliError
from kms.cli.peer_cmd import _kms_id, _read_pem, check_deadline, check_rate, checked_address
from kms.cli.psk_input import read_psk
from kms.server.psk_rotation import Owner, registered_label, retire_psk, rotate_psk
from kms.store.peer_versions import PeerUpdateError
from kms.store.psk_versions import PskVersionError, version_name
from kms.store.registry import show_identity


@_errors_to_cli
def cmd_peer_set(args: argparse.Namespace) -> int:
    kms_id = _kms_id(args.kms_id)
    if args.address is not None:
        checked_address(args.address)
    ca_pem = None if args.ca is None else _read_pem(args.ca, "--ca")
    patterns: tuple[str, ...] | None = None
    if args.clear_resolve_for:
        patterns = ()
    elif args.resolve_for:
        patterns = tuple(args.resolve_for)
    if args.rate is not None:
        check_rate(args.rate)
    if args.deadline_ms is not None:
        check_deadline(args.deadline_ms)
    given = (args.address, ca_pem, patterns, args.rate, args.deadline_ms)
    if all(v is None for v in given):
        raise CliError(
            "nothing to change: give --address, --ca, --resolve-for, --clear-resolve-for, "
            "--rate or --deadline-ms"
        )
    with _open(args) as h:
        try:
            peer = h.registry.update_peer(
                kms_id, address=args.address, ca_pem=ca_pem, resolve_for=patterns,
                rate_limit=args.rate, deadline_ms=args.deadline_ms,
            )  # fmt: skip
        except PeerUpdateError as exc:
            raise CliError(str(exc)) from None
    print(f"peer KMS {show_identity(peer.kms_id)}: address {peer.address}, "
          f"CA {'yes' if peer.ca_pem else 'no'}, deadline {peer.deadline_ms} ms, "
          f"rate {f'{peer.rate_limit:g}/s' if peer.rate_limit else 'unlimited'}")  # fmt: skip
    print("  may resolve for: " + (", ".join(peer.resolve_for) or "nobody"))
    print("  a running `kms serve` uses the new settings from its next call to or from it")
    return 0


@_errors_to_cli
def cmd_rotate(args: argparse.Namespace) -> int:
    kms_id = _kms_id(args.kms_id)
    psk = read_psk(args.psk_hex, args.psk_file, "--psk")
    if args.version is not None and args.version < 2:
        raise CliError("--version must be >= 2 (version 1 is the key given to `peer add`)")
    with _open(args) as h:
        registered_label(h, Owner.PEER, kms_id)  # refused before the token PIN is asked for
        try:
            v = rotate_psk(h, kms_id, psk, None, Owner.PEER, args.version)
        except PskVersionError as exc:
            raise CliError(str(exc)) from None
        peer = h.registry.get_peer(kms_id)
        ours = version_name(h.config.kms_id_bytes, v.version)
    who = show_identity(kms_id)
    print(f"peer KMS {who}: new version {v.version} of the shared key, key {v.key_label}")
    print(f"  accepted from the peer at once (its IDRpsk {show_identity(v.name)})")
    print(f"  this KMS still sends with version {peer.send_version}; once the peer has run "
          f"rotate-psk too: `kms peer use-psk {who} {v.version}` (we then send "
          f"{show_identity(ours)})")  # fmt: skip
    return 0


@_errors_to_cli
def cmd_use(args: argparse.Namespace) -> int:
    kms_id = _kms_id(args.kms_id)
    with _open(args) as h:
        registered_label(h, Owner.PEER, kms_id)
        try:
            h.registry.use_peer_psk_version(kms_id, args.version)
        except PskVersionError as exc:
            raise CliError(str(exc)) from None
        ours = version_name(h.config.kms_id_bytes, args.version)
    print(f"peer KMS {show_identity(kms_id)}: this KMS now sends with version {args.version} "
          f"of the shared key (IDRpsk {show_identity(ours)})")  # fmt: skip
    return 0


@_errors_to_cli
def cmd_retire(args: argparse.Namespace) -> int:
    kms_id = _kms_id(args.kms_id)
    with _open(args) as h:
        registered_label(h, Owner.PEER, kms_id)
        try:
            v = retire_psk(h, kms_id, args.version, Owner.PEER)
        except PskVersionError as exc:
            raise CliError(str(exc)) from None
    print(f"retired version {v.version} of the key shared with peer KMS "
          f"{show_identity(kms_id)} (key {v.key_label} destroyed); the peer's messages "
          "under it are refused from now on")  # fmt: skip
    return 0


@_errors_to_cli
def cmd_list(args: argparse.Namespace) -> int:
    kms_id = _kms_id(args.kms_id)
    with _open(args) as h:
        label = registered_label(h, Owner.PEER, kms_id)
        peer = h.registry.get_peer(kms_id)
        versions = h.registry.psk_versions(kms_id)
    now = time.time()
    rows: list[dict[str, Any]] = [
        {
            "version": v.version,
            "name": show_identity(v.name),
            "key_label": v.key_label,
            "state": v.state(now),
            "sending": v.version == peer.send_version,
            "created_at": _show_time(v.created_at),
        }
        for v in versions
    ] or [
        {"version": 1, "name": show_identity(kms_id), "key_label": label, "state": "active",
         "sending": True, "created_at": _show_time(peer.created_at)}
    ]  # fmt: skip
    if not args.json:
        for r in rows:
            r["sending"] = "yes" if r["sending"] else "-"
    print_listing(args.json, rows, [
        ("VERSION", "version"), ("PEER SENDS (IDRpsk)", "name"), ("KEY", "key_label"),
        ("STATE", "state"), ("WE SEND", "sending"), ("CREATED", "created_at"),
    ])  # fmt: skip
    return 0


def register(sub: Any) -> None:  # argparse._SubParsersAction
    """Add the verbs to ``kms peer`` (registered by kms.cli.peer_cmd)."""
    peer = sub.choices["peer"]
    psub = next(a for a in peer._actions if isinstance(a, argparse._SubParsersAction))
    fmt = argparse.RawDescriptionHelpFormatter

    q = psub.add_parser(
        "set",
        help="change a peer KMS's address, CA, trust, rate or deadline (no restart)",
        formatter_class=fmt,
        description=(
            "Change the settings `kms peer add` gave KMS-ID; the others stay. A running\n"
            "`kms serve` reads them on its next call to or from the peer (no restart).\n"
            "--resolve-for replaces the whole list; --clear-resolve-for empties it (the\n"
            "peer may then resolve none of our tickets). The shared key is rotated with\n"
            "`kms peer rotate-psk`."
        ),
    )
    q.add_argument("kms_id", metavar="KMS-ID")
    q.add_argument("--address", metavar="HOST:PORT", help="where the peer's `kms serve` listens")
    q.add_argument("--ca", metavar="PEM", help="CA certificate(s) of the peer's TLS server")
    trust = q.add_mutually_exclusive_group()
    trust.add_argument("--resolve-for", action="append", metavar="PATTERN",
                       help="identity pattern the peer may resolve for (repeatable; "
                       "replaces the list)")  # fmt: skip
    trust.add_argument("--clear-resolve-for", action="store_true",
                       help="the peer may resolve for nobody")  # fmt: skip
    q.add_argument(
        "--rate",
        type=float,
        metavar="N",
        help="resolves per second the peer may ask of us (0: unlimited)",
    )
    q.add_argument(
        "--deadline-ms",
        type=int,
        metavar="N",
        help="deadline for calls to the peer, retries included",
    )
    q.set_defaults(func=cmd_peer_set)

    q = psub.add_parser(
        "rotate-psk",
        help="add a new version of the key shared with a peer; accepted from it at once",
        formatter_class=fmt,
        description=(
            "Import a new version of the key shared with KMS-ID (the same value on both\n"
            "KMSs: generate it once, give it to both operators) into the token, sensitive\n"
            "and non-extractable, under a fresh label. The peer's messages naming it (IDRpsk\n"
            "KMS-ID#psk<N>) are accepted at once; this KMS keeps sending with its current\n"
            "version until `kms peer use-psk`. Both KMSs must give the key the same number:\n"
            "the next one by default, or --version N (newer than every existing one).\n"
            "The procedure: docs/federation.md, 'Rotating the key shared with a peer'."
        ),
    )
    q.add_argument("kms_id", metavar="KMS-ID")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--psk-hex", metavar="HEX", help="the new shared key in hexadecimal")
    src.add_argument("--psk-file", metavar="FILE", help="file holding the new key in hex")
    q.add_argument(
        "--version",
        type=int,
        metavar="N",
        help="the version number (default: one more than the newest)",
    )
    q.set_defaults(func=cmd_rotate)

    q = psub.add_parser(
        "use-psk",
        help="switch the version of the shared key this KMS sends to a peer with",
        formatter_class=fmt,
        description=(
            "From the next forwarded resolve on, this KMS sends to KMS-ID with VERSION of\n"
            "the shared key, naming it in IDRpsk (<our id>#psk<VERSION>; version 1: our\n"
            "bare id). The peer must hold that version already (its `rotate-psk`).\n"
            "Refused for a version that does not exist or is retired."
        ),
    )
    q.add_argument("kms_id", metavar="KMS-ID")
    q.add_argument("version", metavar="VERSION", type=int)
    q.set_defaults(func=cmd_use)

    q = psub.add_parser(
        "retire-psk",
        help="retire a version of a peer's shared key (refused from now on, destroyed)",
        formatter_class=fmt,
        description=(
            "Retire VERSION of the key shared with KMS-ID: the peer's messages under it are\n"
            "refused (like a wrong MAC) and its token object is destroyed. Refused for the\n"
            "version this KMS sends with (switch with `use-psk` first) and for the last one."
        ),
    )
    q.add_argument("kms_id", metavar="KMS-ID")
    q.add_argument("version", metavar="VERSION", type=int)
    q.set_defaults(func=cmd_retire)

    q = psub.add_parser(
        "psk-list",
        help="list the versions of a peer's shared key (labels, states; never values)",
        description="List the versions of the key shared with KMS-ID and which one we send with.",
    )
    q.add_argument("kms_id", metavar="KMS-ID")
    _json_flag(q)
    q.set_defaults(func=cmd_list)


__all__ = ["register"]
