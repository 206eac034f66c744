"""Operator commands: ``init``, ``endpoint``, ``group``, ``keys``, ``tpk``.

The commands are thin: validation of what the operator typed happens here (before the
token is opened), the work itself in :mod:`kms.home`, which keeps the token and the
registry consistent. Every expected failure becomes a :class:`CliError` (one line, exit 1);
no message ever contains a PSK, a PIN or a key value.

Identities are taken from argv as the exact bytes the shell passed (``os.fsencode``), so
non-UTF-8 byte-string identities can be given too; they are never case-folded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hsm.uri import Pkcs11UriError, key_uri, parse_uri
from kms.cli.errors import CliError
from kms.cli.psk_input import generate_psk, psk_file_written, read_psk
from kms.cli.token_cmd import add_token_uri_option, token_options
from kms.home import (
    Home,
    HomeError,
    guess_id_type,
    init_home,
    open_home,
    validate_identity,
)
from kms.keystore import KeyStoreError
from kms.mikey.constants import IdType
from kms.server.config import ConfigError
from kms.store.registry import (
    DuplicateEndpoint,
    RegistryError,
    TpkState,
    show_identity,
)

# The CLI names of the IDR ID types (RFC 6043 6.6): --id-type values and `endpoint list`.
ID_TYPES = {"nai": IdType.NAI, "uri": IdType.URI, "bytes": IdType.BYTE_STRING}
ID_TYPE_NAMES = {t: name for name, t in ID_TYPES.items()}
DEFAULT_GENERATED_PSK = 32

Handler = Callable[[argparse.Namespace], int]


def _errors_to_cli(func: Handler) -> Handler:
    """Turn the expected failures into CliError. Key-store errors pass through: the root
    prints them as ``key store: ...``."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CliError:
            raise
        except (HomeError, RegistryError, ConfigError) as exc:
            raise CliError(str(exc)) from None
        except KeyStoreError:
            raise
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            raise CliError(f"{exc.strerror or type(exc).__name__}:{where}") from None

    return wrapper


def _open(args: argparse.Namespace) -> Home:
    return open_home(Path(args.home))


def _identity(text: str) -> bytes:
    # argv was decoded with surrogateescape; fsencode gives back the exact bytes.
    return os.fsencode(text)


def _show_time(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _cell(value: object) -> str:
    """A JSON value as a table cell: none, empty or an empty list is "-", a flag yes/no,
    a list comma-separated."""
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def print_listing(
    as_json: bool,
    records: list[dict[str, Any]],
    columns: Sequence[tuple[str, str]],
    empty: str | None = None,
) -> None:
    """What a ``list`` verb prints: ``records`` as JSON (``--json``), or a table of the
    ``columns`` (header, record key), each cell by :func:`_cell`; ``empty``: the line for
    no records (else a header alone)."""
    if as_json:
        print(json.dumps(records, indent=2))
    elif not records and empty is not None:
        print(empty)
    else:
        _print_table(
            [[_cell(r[key]) for _, key in columns] for r in records],
            [header for header, _ in columns],
        )


# ------------------------------------------------------------------------------------------
# init


@_errors_to_cli
def cmd_init(args: argparse.Namespace) -> int:
    home = Path(args.home)

    def progress(msg: str) -> None:
        print(f"kms init: {msg}", file=sys.stderr, flush=True)

    token = token_options(args)
    h = init_home(
        home,
        args.kms_id,
        module=token.module,
        token_label=token.label,
        token_serial=token.serial,
        pin_env=token.pin_env,
        pin_file=None if token.pin_file is None else Path(token.pin_file),
        progress=progress,
        token_uri=args.token_uri,
    )
    try:
        print(f"initialised KMS home {h.path} for {h.config.kms_id}")
        print(f"  token:       {h.config.token.label or h.config.token.serial} "
              f"({h.config.token.module})")
        print(f"  certificate: {h.path / 'kms-cert.pem'}")
        tpk = h.registry.tpk_current()
        print(f"  TPK:         version {tpk.version if tpk else '?'} (current)")
    finally:
        h.close()
    return 0


# ------------------------------------------------------------------------------------------
# endpoint


@_errors_to_cli
def cmd_endpoint_add(args: argparse.Namespace) -> int:
    identity = _identity(args.identity)
    id_type = ID_TYPES[args.id_type] if args.id_type else guess_id_type(identity)
    validate_identity(identity, id_type)
    out: Path | None = None
    if args.psk_hex is not None or args.psk_file is not None:
        psk = read_psk(args.psk_hex, args.psk_file, "--psk")
    else:
        out = Path(args.generate_psk)
        psk = generate_psk(args.psk_length, out, "--generate-psk")

    with _open(args) as h:
        if h.registry.find_endpoint(identity) is not None:
            raise DuplicateEndpoint(f"endpoint {show_identity(identity)} already exists")
        with psk_file_written(out, psk):
            ep = h.add_endpoint(identity, id_type, psk)
    print(f"added endpoint {show_identity(ep.identity)} ({ID_TYPE_NAMES[ep.id_type]}), "
          f"key {ep.key_label}")
    if out is not None:
        print(f"new {len(psk)}-byte PSK written to {out} (mode 0600)")
    return 0


@_errors_to_cli
def cmd_endpoint_remove(args: argparse.Namespace) -> int:
    identity = _identity(args.identity)
    with _open(args) as h:
        groups = h.registry.groups_of(identity)
        ep = h.remove_endpoint(identity)
    print(f"removed endpoint {show_identity(ep.identity)} and destroyed key {ep.key_label}")
    if groups:
        print("  removed from groups: " + ", ".join(show_identity(g) for g in groups))
    return 0


@_errors_to_cli
def cmd_endpoint_list(args: argparse.Namespace) -> int:
    with _open(args) as h:
        eps = h.registry.list_endpoints()
        groups = {ep.identity: h.registry.groups_of(ep.identity) for ep in eps}
        # After a rotation (RFC 6043 4.2.1: IDRpsk names the version), the endpoint's key is
        # its newest version still accepted, not the first one (retired and destroyed).
        current = {
            ep.identity: max(
                (v for v in h.registry.psk_versions(ep.identity) if not v.retired),
                key=lambda v: v.version, default=None,
            )
            for ep in eps
        }
    records = [
        {
            "identity": show_identity(ep.identity),
            "identity_hex": ep.identity.hex(),
            "id_type": ID_TYPE_NAMES[ep.id_type],
            "key_label": (c.key_label if (c := current[ep.identity]) else ep.key_label),
            "psk_version": c.version if c else 1,
            "enabled": ep.enabled,
            "created_at": _show_time(ep.created_at),
            "groups": [show_identity(g) for g in groups[ep.identity]],
        }
        for ep in eps
    ]
    print_listing(args.json, records, [
        ("IDENTITY", "identity"), ("TYPE", "id_type"), ("KEY LABEL", "key_label"),
        ("PSK", "psk_version"), ("ENABLED", "enabled"), ("CREATED", "created_at"),
        ("GROUPS", "groups"),
    ])  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------
# group


@_errors_to_cli
def cmd_group_add(args: argparse.Namespace) -> int:
    group = _identity(args.group)
    with _open(args) as h:
        g = h.registry.add_group(group, [_identity(m) for m in args.members])
    print(f"group {show_identity(g.identity)}: {len(g.members)} member(s)")
    return 0


@_errors_to_cli
def cmd_group_remove(args: argparse.Namespace) -> int:
    group = _identity(args.group)
    with _open(args) as h:
        if args.members:
            g = h.registry.remove_group_members(group, [_identity(m) for m in args.members])
            print(f"group {show_identity(g.identity)}: {len(g.members)} member(s) left")
        else:
            g = h.registry.remove_group(group)
            print(f"removed group {show_identity(g.identity)}")
    return 0


@_errors_to_cli
def cmd_group_list(args: argparse.Namespace) -> int:
    with _open(args) as h:
        groups = h.registry.list_groups()
    records = [
        {"group": show_identity(g.identity), "members": [show_identity(m) for m in g.members]}
        for g in groups
    ]
    print_listing(args.json, records, [("GROUP", "group"), ("MEMBERS", "members")])
    return 0


# ------------------------------------------------------------------------------------------
# keys


@_errors_to_cli
def cmd_keys_list(args: argparse.Namespace) -> int:
    with _open(args) as h:
        entries = h.key_inventory()
        token_label = h.config.token.label
    if args.json:
        out: list[dict[str, Any]] = []
        for e in entries:
            item: dict[str, Any] = {
                "label": e.label, "owner": e.owner, "present": e.info is not None
            }
            if e.info is not None:
                item.update(
                    # RFC 7512: the key as p11-kit / OpenSSL / GnuTLS users name it.
                    uri=key_uri(token_label, e.label,
                                "secret-key" if e.info.key_type.value in ("secret", "aes")
                                else "private"),
                    type=e.info.key_type.value,
                    bits=e.info.length_bits,
                    sensitive=e.info.sensitive,
                    extractable=e.info.extractable,
                    always_sensitive=e.info.always_sensitive,
                    never_extractable=e.info.never_extractable,
                )
            out.append(item)
        print(json.dumps(out, indent=2))
        return 0

    def yn(flag: bool) -> str:
        return "yes" if flag else "no"

    rows = []
    for e in entries:
        owner = e.owner or "ORPHAN (not in the registry)"
        if e.info is None:
            rows.append([e.label, "-", "-", "-", "-", "-", f"MISSING from token: {owner}"])
        else:
            i = e.info
            rows.append([e.label, i.key_type.value, str(i.length_bits), yn(i.sensitive),
                         yn(i.extractable), yn(i.never_extractable), owner])
    _print_table(rows, ["LABEL", "TYPE", "BITS", "SENSITIVE", "EXTRACTABLE",
                        "NEVER-EXTRACTABLE", "USED BY"])
    return 0


@_errors_to_cli
def cmd_keys_delete_orphan(args: argparse.Namespace) -> int:
    label = args.label
    with _open(args) as h:
        if label.lower().startswith("pkcs11:"):
            label = _label_from_key_uri(label, h.config.token.label)
        h.delete_orphan(label)
    print(f"destroyed orphan token object {label}")
    return 0


def _label_from_key_uri(text: str, token_label: str | None) -> str:
    """LABEL from a key's PKCS#11 URI (RFC 7512 ``object=``), which must name this token."""
    try:
        uri = parse_uri(text)
    except Pkcs11UriError as exc:
        raise CliError(f"{text}: {exc}") from None
    if uri.object_label is None:
        raise CliError("the PKCS#11 URI names no key (object=LABEL)")
    if uri.token_label is not None and uri.token_label != token_label:
        raise CliError(f"the PKCS#11 URI names token {uri.token_label!r}, not this home's "
                       f"{token_label!r}")
    return uri.object_label


# ------------------------------------------------------------------------------------------
# tpk


@_errors_to_cli
def cmd_tpk_rotate(args: argparse.Namespace) -> int:
    with _open(args) as h:
        tpk = h.rotate_tpk()
    print(f"TPK version {tpk.version} ({tpk.key_label}) is now current; "
          "older versions stay active")
    return 0


@_errors_to_cli
def cmd_tpk_retire(args: argparse.Namespace) -> int:
    with _open(args) as h:
        tpk = h.retire_tpk(args.version)
    print(f"TPK version {tpk.version} retired and {tpk.key_label} destroyed")
    return 0


@_errors_to_cli
def cmd_tpk_list(args: argparse.Namespace) -> int:
    with _open(args) as h:
        versions = h.registry.tpk_versions()
    if args.json:
        print(json.dumps([
            {"version": t.version, "state": t.state.value, "key_label": t.key_label,
             "created_at": _show_time(t.created_at)}
            for t in versions
        ], indent=2))
        return 0
    _print_table(
        [[str(t.version), t.state.value, t.key_label if t.state is not TpkState.RETIRED
          else f"({t.key_label} destroyed)", _show_time(t.created_at)] for t in versions],
        ["VERSION", "STATE", "KEY LABEL", "CREATED"],
    )
    return 0


# ------------------------------------------------------------------------------------------
# parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def register(sub: Any) -> None:  # argparse._SubParsersAction
    """Add the operator commands to the ``kms`` parser."""
    fmt = argparse.RawDescriptionHelpFormatter

    # init -------------------------------------------------------------------------------
    p = sub.add_parser(
        "init",
        help="initialise a KMS home (token, keys, registry, kms.toml)",
        formatter_class=fmt,
        description=(
            "Initialise the KMS home: create (or use) the token, generate TPK version 1, the\n"
            "RSA-2048 envelope key with a self-signed certificate (kms-cert.pem), the RSA-2048\n"
            "signing key (kms-signing-cert.pem), the registry and kms.toml.\n\n"
            "Without --module an embedded SoftHSM2 token is created under <home>/token with\n"
            "random PINs (user PIN in <home>/token/pin, SO PIN in <home>/token/so-pin, 0600).\n"
            "With --module the token must already exist; name it with --token-label or\n"
            "--token-serial and say where its user PIN is with --pin-env or --pin-file.\n"
            "Refuses a home that already has kms.toml. On failure nothing is left behind."
        ),
    )
    p.add_argument("--kms-id", required=True, metavar="URI",
                   help="the KMS identity (IDRkms), e.g. kms:kms.example.org")
    p.add_argument("--module", metavar="PATH",
                   help="PKCS#11 module of an existing token (default: embedded SoftHSM2)")
    p.add_argument("--token-label", metavar="LABEL", help="label of the existing token")
    p.add_argument("--token-serial", metavar="SERIAL", help="serial of the existing token")
    pin = p.add_mutually_exclusive_group()
    pin.add_argument("--pin-env", metavar="VAR",
                     help="name of the environment variable holding the user PIN")
    pin.add_argument("--pin-file", metavar="FILE", help="file holding the user PIN")
    add_token_uri_option(p)
    p.set_defaults(func=cmd_init)

    # endpoint ---------------------------------------------------------------------------
    p = sub.add_parser(
        "endpoint",
        help="register, remove and list endpoints (identity + PSK)",
        description="Manage endpoints: identities with a pre-shared key in the token.",
    )
    esub = p.add_subparsers(dest="endpoint_command", metavar="SUBCOMMAND", required=True)

    q = esub.add_parser(
        "add",
        help="register an endpoint and import its PSK into the token",
        formatter_class=fmt,
        description=(
            "Register IDENTITY and store its PSK (16..32 bytes) in the token as a sensitive,\n"
            "non-extractable secret. Give the PSK as hex (--psk-hex; visible in `ps`, prefer\n"
            "--psk-file, a file holding the hex), or let the KMS make one (--generate-psk OUT\n"
            "writes it as hex to OUT, mode 0600, for provisioning the endpoint).\n\n"
            "The ID type defaults to uri for scheme:..., nai for other printable text, bytes\n"
            "otherwise. Identities are stored as exact bytes: no case folding."
        ),
    )
    q.add_argument("identity", metavar="IDENTITY", help="e.g. sip:alice@example.org")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--psk-hex", metavar="HEX", help="the PSK in hexadecimal")
    src.add_argument("--psk-file", metavar="FILE", help="file holding the PSK in hexadecimal")
    src.add_argument("--generate-psk", metavar="OUT",
                     help="generate a random PSK and write it as hex to OUT (0600)")
    q.add_argument("--psk-length", type=int, default=DEFAULT_GENERATED_PSK, metavar="BYTES",
                   help=f"length of a generated PSK (default {DEFAULT_GENERATED_PSK})")
    q.add_argument("--id-type", choices=sorted(ID_TYPES), help="IDR ID type (default: guessed)")
    q.set_defaults(func=cmd_endpoint_add)

    q = esub.add_parser(
        "remove",
        help="unregister an endpoint and destroy its PSK",
        description="Unregister IDENTITY, remove it from its groups and destroy its PSK.",
    )
    q.add_argument("identity", metavar="IDENTITY")
    q.set_defaults(func=cmd_endpoint_remove)

    q = esub.add_parser(
        "list",
        help="list endpoints (identities and key labels, never keys)",
        description="List registered endpoints with their key labels and groups.",
    )
    _json_flag(q)
    q.set_defaults(func=cmd_endpoint_list)

    # group ------------------------------------------------------------------------------
    p = sub.add_parser(
        "group",
        help="manage groups of endpoints",
        description="Manage groups: a group identity stands for its member endpoints.",
    )
    gsub = p.add_subparsers(dest="group_command", metavar="SUBCOMMAND", required=True)
    q = gsub.add_parser(
        "add",
        help="create a group or add members to it",
        description="Create GROUP with the given members, or add them to the existing GROUP.\n"
        "Members must be registered endpoints; nothing changes if one is not.",
    )
    q.add_argument("group", metavar="GROUP")
    q.add_argument("members", metavar="MEMBER", nargs="+")
    q.set_defaults(func=cmd_group_add)
    q = gsub.add_parser(
        "remove",
        help="remove members from a group, or the whole group",
        description="With MEMBERs, remove them from GROUP (all or nothing); without, remove "
        "the group.",
    )
    q.add_argument("group", metavar="GROUP")
    q.add_argument("members", metavar="MEMBER", nargs="*")
    q.set_defaults(func=cmd_group_remove)
    q = gsub.add_parser("list", help="list groups and members",
                        description="List groups and their members.")
    _json_flag(q)
    q.set_defaults(func=cmd_group_list)

    # keys -------------------------------------------------------------------------------
    p = sub.add_parser(
        "keys",
        help="inspect the token's keys (never their values)",
        description="Inspect the token objects and what the registry uses them for.",
    )
    ksub = p.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)
    q = ksub.add_parser(
        "list",
        help="list token keys: label, type, length, flags, owner",
        description="List every token object with its type, length, sensitive/extractable\n"
        "flags and what uses it (endpoint, TPK version, KMS key). Objects the registry does\n"
        "not know are ORPHANs; registry entries without an object are MISSING.",
    )
    _json_flag(q)
    q.set_defaults(func=cmd_keys_list)
    q = ksub.add_parser(
        "delete-orphan",
        help="destroy a token object that the registry does not use",
        description="Destroy LABEL, only if no endpoint, TPK, peer or KMS key uses it (e.g.\n"
        "an object left behind by an interrupted command). LABEL may be the key's PKCS#11\n"
        "URI (RFC 7512), as `kms keys list --json` prints it: pkcs11:token=T;object=LABEL.",
    )
    q.add_argument("label", metavar="LABEL")
    q.set_defaults(func=cmd_keys_delete_orphan)

    # tpk --------------------------------------------------------------------------------
    p = sub.add_parser(
        "tpk",
        help="rotate, retire and list Ticket Protection Keys",
        description="Manage Ticket Protection Key versions (current / active / retired).",
    )
    tsub = p.add_subparsers(dest="tpk_command", metavar="SUBCOMMAND", required=True)
    q = tsub.add_parser(
        "rotate",
        help="create a new TPK version and make it current",
        description="Create a 32-byte TPK in the token as the new current version. Older\n"
        "versions stay active, so tickets protected by them still resolve.",
    )
    q.set_defaults(func=cmd_tpk_rotate)
    q = tsub.add_parser(
        "retire",
        help="retire a TPK version and destroy its key",
        description="Retire VERSION: destroy its token object; tickets protected by it no\n"
        "longer resolve. The current version cannot be retired (rotate first).",
    )
    q.add_argument("version", metavar="VERSION", type=_positive_int)
    q.set_defaults(func=cmd_tpk_retire)
    q = tsub.add_parser("list", help="list TPK versions and states",
                        description="List TPK versions, their state and key labels.")
    _json_flag(q)
    q.set_defaults(func=cmd_tpk_list)


__all__ = ["register"]
