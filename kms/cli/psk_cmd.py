"""``kms endpoint rotate-psk | retire-psk | psk-list``: replace an endpoint's PSK without a
window in which it cannot call (RFC 6043 4.2.1 / 4.2.3: IDRpsk names the PSK used).

``rotate-psk`` makes a new random PSK, imports it into the token as the endpoint's next
version and shows it ONCE (hex, with its name) for provisioning the phone; messages naming
the new version (IDRpsk) work at once, and the older versions keep working until they are
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
from kms.cli.psk_input import generate_psk, psk_file_written
from kms.home import PSK_MAX_BYTES, PSK_MIN_BYTES
from kms.server.psk_rotation import retire_due, retire_psk, rotate_psk
from kms.store.psk_versions import PskVersionError
from kms.store.registry import show_identity


def _show_name(name: bytes) -> str:
    return show_identity(name)


@_errors_to_cli
def cmd_rotate(args: argparse.Namespace) -> int:
    identity = _identity(args.identity)
    out = Path(args.out) if args.out else None
    psk = generate_psk(args.psk_length, out, "--out")
    with _open(args) as h:
        h.registry.get_endpoint(identity)
        try:
            with psk_file_written(out, psk):
                v = rotate_psk(h, identity, psk, args.overlap)
        except PskVersionError as exc:
            raise CliError(str(exc)) from None
        retire_at = h.registry.psk_versions(identity)[0].retire_at
    print(f"endpoint {show_identity(identity)}: new PSK version {v.version}, key {v.key_label}")
    print(f"  name (IDRpsk): {_show_name(v.name)}")
    if out is not None:
        print(f"  {len(psk)}-byte PSK written to {out} (mode 0600)")
    else:
        print(f"  psk: {psk.hex()}  (shown once; it stays in the token)")
    if args.overlap is not None and retire_at is not None:
        print(f"  older versions accepted until {_show_time(retire_at)}")
    else:
        print("  older versions accepted until `kms endpoint retire-psk`")
    return 0


@_errors_to_cli
def cmd_retire(args: argparse.Namespace) -> int:
    with _open(args) as h:
        if args.due:
            if args.identity is not None or args.version is not None:
                raise CliError("--due takes no IDENTITY or VERSION")
            done = retire_due(h)
            for v in done:
                print(f"retired PSK version {v.version} of {show_identity(v.identity)} "
                      f"(key {v.key_label} destroyed)")
            if not done:
                print("no PSK version is due")
            return 0
        if args.identity is None or args.version is None:
            raise CliError("give IDENTITY and VERSION, or --due")
        try:
            v = retire_psk(h, _identity(args.identity), args.version)
        except PskVersionError as exc:
            raise CliError(str(exc)) from None
    print(f"retired PSK version {v.version} of {show_identity(v.identity)} "
          f"(key {v.key_label} destroyed)")
    return 0


@_errors_to_cli
def cmd_list(args: argparse.Namespace) -> int:
    identity = _identity(args.identity)
    with _open(args) as h:
        ep = h.registry.get_endpoint(identity)
        versions = h.registry.psk_versions(identity)
    now = time.time()
    rows: list[dict[str, Any]] = [
        {
            "version": v.version,
            "name": _show_name(v.name),
            "key_label": v.key_label,
            "state": "retired" if v.retired else ("active" if v.usable(now) else "expired"),
            "created_at": _show_time(v.created_at),
            "accepted_until": _show_time(v.retire_at) if v.retire_at is not None else None,
        }
        for v in versions
    ] or [
        {"version": 1, "name": show_identity(identity), "key_label": ep.key_label,
         "state": "active", "created_at": _show_time(ep.created_at), "accepted_until": None}
    ]  # fmt: skip
    print_listing(args.json, rows, [
        ("VERSION", "version"), ("NAME (IDRpsk)", "name"), ("KEY", "key_label"),
        ("STATE", "state"), ("CREATED", "created_at"), ("ACCEPTED UNTIL", "accepted_until"),
    ])  # fmt: skip
    return 0


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
    fmt = argparse.RawDescriptionHelpFormatter
    q = esub.add_parser(
        "rotate-psk",
        help="give an endpoint a new PSK version; the old one keeps working until retired",
        description=__doc__,
        formatter_class=fmt,
    )
    q.add_argument("identity", metavar="IDENTITY")
    q.add_argument("--overlap", type=_nonneg_int, metavar="SECONDS",
                   help="accept the older versions for this long, then refuse them "
                   "(default: until `retire-psk`)")  # fmt: skip
    q.add_argument("--psk-length", type=int, default=32, metavar="BYTES",
                   help=f"length of the new PSK (default 32; {PSK_MIN_BYTES}..{PSK_MAX_BYTES})")
    q.add_argument("--out", metavar="FILE",
                   help="write the new PSK (hex) to FILE, mode 0600, instead of printing it")
    q.set_defaults(func=cmd_rotate)
    q = esub.add_parser(
        "retire-psk",
        help="retire a PSK version (refused from now on, token object destroyed)",
        description=(
            "Retire VERSION of IDENTITY's PSK: messages under it are refused and its token\n"
            "object is destroyed. The endpoint's last usable version cannot be retired.\n"
            "--due retires every version whose --overlap has ended."
        ),
        formatter_class=fmt,
    )
    q.add_argument("identity", metavar="IDENTITY", nargs="?")
    q.add_argument("version", metavar="VERSION", type=int, nargs="?")
    q.add_argument("--due", action="store_true", help="retire every version past its overlap")
    q.set_defaults(func=cmd_retire)
    q = esub.add_parser(
        "psk-list",
        help="list an endpoint's PSK versions (names, labels, states; never values)",
        description="List IDENTITY's PSK versions.",
    )
    q.add_argument("identity", metavar="IDENTITY")
    _json_flag(q)
    q.set_defaults(func=cmd_list)
