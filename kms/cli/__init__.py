"""The ``kms`` command line: the composition root for operators.

Each sub-module registers its own sub-commands; this module only builds the parser and
turns :class:`CliError` (and key-store errors) into a one-line message and exit status.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kms.cli.errors import CliError
from kms.keystore import KeyStoreError

__all__ = ["CliError", "build_parser", "default_home", "main"]


def default_home() -> Path:
    """--home, else $KMS_HOME, else ./kms-home."""
    return Path(os.environ.get("KMS_HOME") or "kms-home")


class _ExactParser(argparse.ArgumentParser):
    """No abbreviated options (``--psk`` for ``--psk-hex``): a script's option must mean
    the same after a later release adds a longer one. Sub-command parsers are made of the
    same class (argparse uses the parent's), so this holds for every command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _ExactParser(
        prog="kms",
        description="HSM-backed Key Management Service for MIKEY-TICKET (RFC 6043).",
    )
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="KMS home folder (default: $KMS_HOME, else ./kms-home)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from kms.cli import (  # each registers itself
        admin,
        app_cmd,
        backup_cmd,
        call_cmd,
        mikey_cmd,
        node_cmd,
        peer_cmd,
        peer_psk_cmd,
        psk_cmd,
        revoke_cmd,
        serve_cmd,
        status_cmd,
        store_cmd,
        token_cmd,
    )

    mikey_cmd.register(sub)
    admin.register(sub)
    psk_cmd.register(sub)  # kms endpoint rotate-psk / retire-psk / psk-list
    serve_cmd.register(sub)
    call_cmd.register(sub)
    peer_cmd.register(sub)
    peer_psk_cmd.register(sub)  # kms peer set / rotate-psk / use-psk / retire-psk / psk-list
    app_cmd.register(sub)
    token_cmd.register(sub)
    status_cmd.register(sub)
    store_cmd.register(sub)
    revoke_cmd.register(sub)
    node_cmd.register(sub)  # kms node ..., kms audit nodes
    backup_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.home is None:
        args.home = default_home()
    try:
        rc: int = args.func(args)
    except CliError as exc:
        print(f"kms: error: {exc}", file=sys.stderr)
        return 1
    except KeyStoreError as exc:
        print(f"kms: error: key store: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our output went away (``kms status --json | head``): no traceback.
        # stdout now points at /dev/null, so the interpreter's last flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # what a shell reports for a reader that left
    return rc


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
