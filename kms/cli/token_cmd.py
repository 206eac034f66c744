"""``kms token check``, and the ``--token-uri`` option (PKCS#11 URI, RFC 7512) of ``kms init``.

``kms token check`` runs against the token of the home's kms.toml, or against any module and
token named on the command line (``--token-uri`` or ``--module`` / ``--token-label`` /
``--token-serial`` with ``--pin-env`` / ``--pin-file``), so that an operator can evaluate an
HSM before making a KMS home on it. Exit status 0: the KMS can run on it; 1: it cannot (or
the token could not be opened).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hsm
from hsm.uri import Pkcs11UriError, parse_uri
from kms.cli.errors import CliError
from kms.keystore import KeyStoreError
from kms.server.config import ConfigError, load_config
from kms.server.token_needs import required_operations


@dataclass(frozen=True)
class TokenOptions:
    module: str | None
    label: str | None
    serial: str | None
    pin_env: str | None
    pin_file: str | None


def add_token_uri_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token-uri", metavar="URI",
        help="the token as a PKCS#11 URI (RFC 7512), e.g. 'pkcs11:token=kms?module-path="
             "/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/kms/pin' (pin-source may "
             "also be env:VAR; pin-value is refused)",
    )


def _merge(what: str, direct: str | None, from_uri: str | None) -> str | None:
    if direct is not None and from_uri is not None and direct != from_uri:
        raise CliError(f"{what} {direct!r} differs from the --token-uri's {from_uri!r}")
    return direct if direct is not None else from_uri


def token_options(args: argparse.Namespace) -> TokenOptions:
    """--module / --token-label / --token-serial / --pin-env / --pin-file, merged with the
    values of --token-uri (a value given both ways must agree)."""
    module, label, serial = args.module, args.token_label, args.token_serial
    pin_env, pin_file = args.pin_env, args.pin_file
    if getattr(args, "token_uri", None):
        try:
            uri = parse_uri(args.token_uri)
            if uri.object_label is not None:
                raise Pkcs11UriError("names a key (object=); give the token's URI")
            uri_env, uri_file = uri.pin_location()
            uri_module = uri.resolve_module()
        except Pkcs11UriError as exc:
            raise CliError(f"--token-uri: {exc}") from None
        module = _merge("--module", module, uri_module)
        label = _merge("--token-label", label, uri.token_label)
        serial = _merge("--token-serial", serial, uri.token_serial)
        if uri_env is not None or uri_file is not None:
            if pin_env is not None or pin_file is not None:
                raise CliError("--token-uri pin-source and --pin-env / --pin-file both given")
            pin_env, pin_file = uri_env, uri_file
    return TokenOptions(module, label, serial, pin_env, pin_file)


def _token_config(args: argparse.Namespace) -> tuple[hsm.TokenConfig, tuple[str, ...]]:
    opts = token_options(args)
    if opts.module is None and opts.label is None and opts.serial is None:
        # The home's token, with what its configuration needs.
        try:
            config = load_config(Path(args.home))
        except ConfigError as exc:
            raise CliError(f"{exc} (or name a token with --token-uri / --module)") from None
        t = config.token
        pin = hsm.read_pin(t.pin_env, None if t.pin_file is None else str(t.pin_file))
        return hsm.TokenConfig(
            module=t.module, token_label=t.label, token_serial=t.serial, pin=pin,
            softhsm_conf=None if t.softhsm_conf is None else str(t.softhsm_conf),
        ), required_operations(config)
    if opts.module is None:
        raise CliError("name the module: --module PATH or module-path in --token-uri")
    if opts.label is None and opts.serial is None:
        raise CliError("name the token: --token-label, --token-serial or token= in --token-uri")
    pin = hsm.read_pin(opts.pin_env, opts.pin_file)
    return hsm.TokenConfig(module=opts.module, token_label=opts.label, token_serial=opts.serial,
                           pin=pin, softhsm_conf=args.softhsm_conf), _default_needs()


def _default_needs() -> tuple[str, ...]:
    from kms.server.token_needs import BASE_OPERATIONS

    # A token without a home: what a KMS with the default [pk] pke_padding needs.
    return (*BASE_OPERATIONS, "rsa-decrypt-pkcs1v15")


def cmd_token_check(args: argparse.Namespace) -> int:
    try:
        config, needed = _token_config(args)
    except KeyStoreError as exc:  # PinError
        raise CliError(str(exc)) from None
    from hsm.pkcs11.token_check import render_text, run_check  # loads python-pkcs11

    report = run_check(config, required=needed, iterations=args.iterations,
                       threads=args.threads)
    if args.json:
        json.dump(report.as_dict(), sys.stdout, indent=2)
        print()
    else:
        print(render_text(report))
    return 0 if report.can_run else 1


def register(sub: Any) -> None:  # argparse._SubParsersAction
    p = sub.add_parser(
        "token",
        help="evaluate a PKCS#11 module and token for the KMS",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Token commands. `kms token check` opens a module and token and prints, for an\n"
            "operator evaluating an HSM: every operation the KMS needs, the mechanism it will\n"
            "use (or the fallback, or what is missing) and the key-size ranges; probes of\n"
            "session objects, C_CopyObject, non-extractable secrets and RSA keys, and several\n"
            "threads at once; and the median time of each operation. It works on session\n"
            "objects only and leaves nothing on the token. Exit status 0 when the KMS can run\n"
            "on the token, 1 when it cannot. See docs/hsm.md."
        ),
    )
    tsub = p.add_subparsers(dest="token_command", metavar="SUBCOMMAND", required=True)
    q = tsub.add_parser(
        "check",
        help="can the KMS run on this module and token? mechanisms, probes, timings",
        description=(
            "Without token options: the token of the home's kms.toml (and what that "
            "configuration needs). With --token-uri or --module: any module and token."
        ),
    )
    add_token_uri_option(q)
    q.add_argument("--module", metavar="PATH", help="PKCS#11 module file")
    q.add_argument("--token-label", metavar="LABEL", help="token label")
    q.add_argument("--token-serial", metavar="SERIAL", help="token serial number")
    pin = q.add_mutually_exclusive_group()
    pin.add_argument("--pin-env", metavar="VAR", help="environment variable holding the PIN")
    pin.add_argument("--pin-file", metavar="FILE", help="file holding the user PIN")
    q.add_argument("--softhsm-conf", metavar="FILE",
                   help="SOFTHSM2_CONF for a SoftHSM token named on the command line")
    q.add_argument("--iterations", type=int, default=200, metavar="N",
                   help="timed repetitions per operation (RSA: N/10; default 200)")
    q.add_argument("--threads", type=int, default=8, metavar="N",
                   help="threads in the concurrency probe (default 8)")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(func=cmd_token_check)


__all__ = ["TokenOptions", "add_token_uri_option", "register", "token_options"]
