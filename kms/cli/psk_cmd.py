"""``kms endpoint rotate-psk | retire-psk | psk-list`` and the same three verbs of ``kms
node``: replace an endpoint's (or an intermediate node's) PSK without a window in which it
cannot call (RFC 6043 4.2.1 / 4.2.3: IDRpsk names the PSK used).

``rotate-psk`` makes a new random PSK (or imports the one in ``--psk-file``) into the token
as the next version (sensitive, non-extractable) and shows a generated one ONCE (hex, with
its name) for provisioning the device; messages naming the new version (IDRpsk
``<identity>#psk<N>``) work at once, and the older versions keep working until they are
retired: with ``retire-psk``, or automatically at the end of ``--overlap`` (then refused;
``retire-psk --due`` destroys their token objects, e.g. from a daily timer).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from kms.cli.admin import _errors_to_cli, _identity, _json_flag, _open, _show_time, print_listing
from kms.cli.errors import CliError
from kms.cli.psk_input import generate_psk, psk_file_written, read_psk
from kms.home import PSK_MAX_BYTES, PSK_MIN_BYTES, Home
from kms.server.psk_rotation import Owner, registered_label, retire_due, retire_psk, rotate_psk
from kms.store.psk_versions import PskVersionError
from kms.store.registry import show_identity


def _show_name(name: bytes) -> str:
    return show_identity(name)


@_errors_to_cli
def cmd_rotate(args: argparse.Namespace) -> int:
    owner = Owner(args.owner)
    identity = _identity(args.identity)
    out = Path(args.out) if args.out else None
    if args.psk_file is not None:
        if out is not None:
            raise CliError("--psk-file and --out exclude each other (the PSK is in the file)")
        psk = read_psk(None, args.psk_file, "--psk")
    else:
        psk = generate_psk(args.psk_length, out, "--out")
    with _open(args) as h:
        registered_label(h, owner, identity)  # refused before the token PIN is asked for
        try:
            with psk_file_written(out, psk):
                v = rotate_psk(h, identity, psk, args.overlap, owner)
        except PskVersionError as exc:
            raise CliError(str(exc)) from None
        retire_at = h.registry.psk_versions(identity)[0].retire_at
    print(f"{owner.value} {show_identity(identity)}: new PSK version {v.version}, "
          f"key {v.key_label}")  # fmt: skip
    print(f"  name (IDRpsk): {_show_name(v.name)}")
    if out is not None:
        print(f"  {len(psk)}-byte PSK written to {out} (mode 0600)")
    elif args.psk_file is None:
        print(f"  psk: {psk.hex()}  (shown once; it stays in the token)")
    if args.overlap is not None and retire_at is not None:
        print(f"  older versions accepted until {_show_time(retire_at)}")
    else:
        print(f"  older versions accepted until `kms {owner.value} retire-psk`")
    return 0


@_errors_to_cli
def cmd_retire(args: argparse.Namespace) -> int:
    with _open(args) as h:
        if args.due:
            if args.identity is not None or args.version is not None:
                raise CliError("--due takes no IDENTITY or VERSION")
            done = retire_due(h, owner=Owner(args.owner))
            for v in done:
                print(f"retired PSK version {v.version} of {show_identity(v.identity)} "
                      f"(key {v.key_label} destroyed)")
            if not done:
                print("no PSK version is due")
            return 0
        if args.identity is None or args.version is None:
            raise CliError("give IDENTITY and VERSION, or --due")
        identity = _identity(args.identity)
        registered_label(h, Owner(args.owner), identity)  # an endpoint's / a PSK node's
        try:
            v = retire_psk(h, identity, args.version)
        except PskVersionError as exc:
            raise CliError(str(exc)) from None
    print(f"retired PSK version {v.version} of {show_identity(v.identity)} "
          f"(key {v.key_label} destroyed)")
    return 0


@_errors_to_cli
def cmd_list(args: argparse.Namespace) -> int:
    identity = _identity(args.identity)
    with _open(args) as h:
        label, created_at = _registered(h, Owner(args.owner), identity)
        versions = h.registry.psk_versions(identity)
    now = time.time()
    rows: list[dict[str, Any]] = [
        {
            "version": v.version,
            "name": _show_name(v.name),
            "key_label": v.key_label,
            "state": v.state(now),
            "created_at": _show_time(v.created_at),
            "accepted_until": _show_time(v.retire_at) if v.retire_at is not None else None,
        }
        for v in versions
    ] or [
        {"version": 1, "name": show_identity(identity), "key_label": label,
         "state": "active", "created_at": _show_time(created_at), "accepted_until": None}
    ]  # fmt: skip
    print_listing(args.json, rows, [
        ("VERSION", "version"), ("NAME (IDRpsk)", "name"), ("KEY", "key_label"),
        ("STATE", "state"), ("CREATED", "created_at"), ("ACCEPTED UNTIL", "accepted_until"),
    ])  # fmt: skip
    return 0


def _registered(h: Home, owner: Owner, identity: bytes) -> tuple[str, int]:
    """(label of the registered PSK, registration time) of an endpoint or a PSK node."""
    label = registered_label(h, owner, identity)
    if owner == Owner.ENDPOINT:
        return label, h.registry.get_endpoint(identity).created_at
    return label, h.registry.get_node(identity).created_at


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def register(sub: Any) -> None:  # argparse._SubParsersAction
    """Add the PSK verbs to ``kms endpoint`` (registered by kms.cli.admin)."""
    endpoint = sub.choices["endpoint"]
    esub = next(a for a in endpoint._actions if isinstance(a, argparse._SubParsersAction))
    add_psk_verbs(esub, Owner.ENDPOINT)


def add_psk_verbs(esub: Any, owner: Owner) -> None:  # argparse._SubParsersAction
    """``rotate-psk``, ``retire-psk`` and ``psk-list`` for ``kms endpoint`` or ``kms node``."""
    who = owner.value
    name = "IDENTITY" if owner == Owner.ENDPOINT else "NODE"
    fmt = argparse.RawDescriptionHelpFormatter
    q = esub.add_parser(
        "rotate-psk",
        help=f"give {'an' if owner == Owner.ENDPOINT else 'a'} {who} a new PSK version; "
        "the old one keeps working until retired",
        description=(
            f"Give the {who} {name} a new PSK version without a window in which it cannot\n"
            "call (RFC 6043 4.2.1 / 4.2.3: IDRpsk names the PSK used). A new random PSK (or\n"
            "the one in --psk-file) goes into the token as the next version, sensitive and\n"
            "non-extractable; a generated one is shown ONCE (hex, with its name) or written\n"
            f"to --out. Messages naming the new version (IDRpsk {name}#psk<N>) work at once;\n"
            "older versions keep working until `retire-psk`, or until --overlap ends (then\n"
            "refused; `retire-psk --due` destroys their token objects, e.g. daily)."
        ),
        formatter_class=fmt,
    )
    q.add_argument("identity", metavar=name)
    q.add_argument("--overlap", type=_nonneg_int, metavar="SECONDS",
                   help="accept the older versions for this long, then refuse them "
                   "(default: until `retire-psk`)")  # fmt: skip
    q.add_argument("--psk-length", type=int, default=32, metavar="BYTES",
                   help=f"length of the new PSK (default 32; {PSK_MIN_BYTES}..{PSK_MAX_BYTES})")
    q.add_argument("--out", metavar="FILE",
                   help="write the new PSK (hex) to FILE, mode 0600, instead of printing it")
    q.add_argument("--psk-file", metavar="FILE",
                   help="import this PSK (hex in FILE) instead of generating one")
    q.set_defaults(func=cmd_rotate, owner=who)
    q = esub.add_parser(
        "retire-psk",
        help="retire a PSK version (refused from now on, token object destroyed)",
        description=(
            f"Retire VERSION of the {who}'s PSK: messages under it are refused and its\n"
            f"token object is destroyed. The {who}'s last usable version cannot be retired.\n"
            f"--due retires every {who} PSK version whose --overlap has ended."
        ),
        formatter_class=fmt,
    )
    q.add_argument("identity", metavar="IDENTITY" if owner == Owner.ENDPOINT else "NODE",
                   nargs="?")  # fmt: skip
    q.add_argument("version", metavar="VERSION", type=int, nargs="?")
    q.add_argument("--due", action="store_true", help="retire every version past its overlap")
    q.set_defaults(func=cmd_retire, owner=who)
    q = esub.add_parser(
        "psk-list",
        help=f"list {'an' if owner == Owner.ENDPOINT else 'a'} {who}'s PSK versions "
        "(names, labels, states; never values)",
        description=f"List the {who}'s PSK versions.",
    )
    q.add_argument("identity", metavar="IDENTITY" if owner == Owner.ENDPOINT else "NODE")
    _json_flag(q)
    q.set_defaults(func=cmd_list, owner=who)
