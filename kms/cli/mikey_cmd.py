"""``kms mikey``: the MIKEY message inspector (``decode``) and a sample message (``example``).

``kms mikey example | kms mikey decode -`` shows the inspector working without a KMS.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import re
import sys
from pathlib import Path
from typing import Any

from kms.cli import CliError
from kms.cli.mikey_inspect import render_tree, to_json
from kms.mikey.constants import DataType, IdRole, IdType, MacAlg, RandRole, TsType
from kms.mikey.coverage import seal
from kms.mikey.errors import DecodeError
from kms.mikey.header import EmptyMap, Header
from kms.mikey.message import Message
from kms.mikey.payloads import Timestamp, Verification
from kms.mikey.ticket import Idr, RandR, TicketPolicy, TpFlag

FORMATS = ("auto", "hex", "base64", "raw")
_HEX_SEPARATORS = re.compile(r"[\s:]+")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
# RFC 4567: a=key-mgmt:mikey <base64>; RTSP KeyMgmt: prot=mikey; ... data="<base64>"
_SDP_PREFIX = re.compile(r"^(?:a=)?key-mgmt:\s*mikey\s+", re.IGNORECASE)

DECODE_HELP = """\
Decode one MIKEY / MIKEY-TICKET message (RFC 3830, RFC 6043) and print every payload and
field by its RFC name, as an indented tree or, with --json, as JSON (bytes as hex).

INPUT is, in this order of precedence:
  -            (or no INPUT) read standard input
  an existing file path: binary MIKEY bytes, or text holding hex or base64
  otherwise    the argument itself, as hex or base64 text

With --format auto (the default) text is tried as hex first (whitespace, ':' separators and a
leading 0x allowed), then as base64 (standard or URL-safe; an SDP 'a=key-mgmt:mikey ' prefix
is dropped); anything else from a file or stdin is taken as raw bytes. A binary MIKEY message
starts with the version byte 0x01, which is neither hex nor base64 text, so the guesses do
not collide. Force a reading with --format hex|base64|raw.

A malformed message prints 'kms: error: decode: <payload> at offset N: <reason>' and the
command exits with status 1.

examples:
  kms mikey example | kms mikey decode -
  kms mikey decode 010b0580123456780001...
  kms mikey decode --json message.bin
"""

# Demo values for ``kms mikey example`` (not secrets of any deployment).
EXAMPLE_PSK = bytes(range(20))
EXAMPLE_IDI = b"sip:alice@example.org"
EXAMPLE_IDKMS = b"kms:kms.example.org"
EXAMPLE_IDR = b"sip:bob@example.org"


def example_request_init_psk() -> bytes:
    """A REQUEST_INIT_PSK (RFC 6043 4.2.1.1) MACed with a demo PSK (0x00..0x13)."""
    msg = Message(
        Header(DataType.REQUEST_INIT_PSK, 0x12345678, EmptyMap(0), v_flag=True),
        (
            Timestamp(TsType.NTP_UTC_32, bytes.fromhex("ea1c2b3c")),
            RandR(RandRole.RANDRI, bytes(range(0x10, 0x20))),
            Idr(IdRole.IDRI, IdType.URI, EXAMPLE_IDI),
            Idr(IdRole.IDRKMS, IdType.URI, EXAMPLE_IDKMS),
            TicketPolicy(
                flags=TpFlag.F | TpFlag.H | TpFlag.L | TpFlag.N | TpFlag.O,
                payloads=(Idr(IdRole.IDRR, IdType.URI, EXAMPLE_IDR),),
            ),
            Idr(IdRole.IDRPSK, IdType.BYTE_STRING, b"psk-1"),
            Verification(MacAlg.HMAC_SHA_1_160, bytes(20)),
        ),
    )

    def mac(data: bytes) -> bytes:
        return hmac.new(EXAMPLE_PSK, data, hashlib.sha1).digest()

    return seal(msg, mac, EXAMPLE_IDI + EXAMPLE_IDKMS).wire


# --- input --------------------------------------------------------------------------------


def _as_text(data: bytes) -> str | None:
    """Printable ASCII text (line breaks and tabs allowed), else None (binary)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if "".join(text.split()).isprintable() else None


def _from_hex(text: str) -> bytes | None:
    t = _HEX_SEPARATORS.sub("", text.strip())
    if t[:2].lower() == "0x":
        t = t[2:]
    if not t or len(t) % 2 or not all(c in "0123456789abcdefABCDEF" for c in t):
        return None
    return bytes.fromhex(t)


def _from_base64(text: str) -> bytes | None:
    t = re.sub(r"\s+", "", _SDP_PREFIX.sub("", text.strip()))
    if not t or not _BASE64.fullmatch(t):
        return None
    t += "=" * (-len(t) % 4)
    try:
        if "-" in t or "_" in t:
            return base64.urlsafe_b64decode(t)
        return base64.b64decode(t, validate=True)
    except (binascii.Error, ValueError):
        return None


def _is_file(name: str) -> bool:
    """An existing regular file; a long hex argument is not a valid path (ENAMETOOLONG)."""
    try:
        return Path(name).is_file()
    except (OSError, ValueError):
        return False


def read_input(source: str | None, fmt: str) -> bytes:
    """The message bytes named by INPUT (see DECODE_HELP) in the given format."""
    if source in (None, "-"):
        data = sys.stdin.buffer.read()
        origin = "standard input"
        from_arg = False
    elif _is_file(source):
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise CliError(f"input: cannot read {source}: {e.strerror}") from None
        origin = source
        from_arg = False
    else:
        data = source.encode("utf-8", "replace")
        origin = "the argument"
        from_arg = True
    if not data:
        raise CliError(f"input: {origin} is empty")
    if fmt == "raw":
        return data
    text = _as_text(data)
    if fmt == "hex":
        out = _from_hex(text) if text is not None else None
        if out is None:
            raise CliError(f"input: {origin} is not hex")
        return out
    if fmt == "base64":
        out = _from_base64(text) if text is not None else None
        if out is None:
            raise CliError(f"input: {origin} is not base64")
        return out
    # auto: hex, then base64, then raw (never raw for a command-line argument)
    if text is not None:
        for parse in (_from_hex, _from_base64):
            out = parse(text)
            if out is not None:
                return out
    if from_arg:
        raise CliError(f"input: {source!r} is not a file, hex or base64")
    return data


# --- commands -----------------------------------------------------------------------------


def cmd_decode(args: argparse.Namespace) -> int:
    data = read_input(args.input, args.format)
    try:
        msg = Message.decode(data)
    except DecodeError as e:
        raise CliError(f"decode: {e}") from None
    if args.json:
        print(json.dumps(to_json(msg), indent=2))
    else:
        sys.stdout.write(render_tree(msg))
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    del args
    print(example_request_init_psk().hex())
    return 0


def register(sub: Any) -> None:  # argparse._SubParsersAction
    """Add ``kms mikey decode`` and ``kms mikey example``."""
    p = sub.add_parser(
        "mikey",
        help="inspect MIKEY / MIKEY-TICKET messages",
        description="MIKEY message tools: decode (the inspector) and example.",
    )
    msub = p.add_subparsers(dest="mikey_command", metavar="SUBCOMMAND", required=True)

    d = msub.add_parser(
        "decode",
        help="decode a MIKEY message and print its payloads and fields",
        description=DECODE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument(
        "input",
        nargs="?",
        default="-",
        metavar="INPUT",
        help="hex or base64 text, a file (binary, hex or base64), or - for stdin (default)",
    )
    d.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="how to read INPUT (default: auto: hex, then base64, then raw bytes)",
    )
    d.add_argument("--json", action="store_true", help="print JSON instead of a tree")
    d.set_defaults(func=cmd_decode)

    e = msub.add_parser(
        "example",
        help="print a sample REQUEST_INIT_PSK in hex (try: kms mikey example | kms mikey decode -)",
        description=(
            "Print a sample REQUEST_INIT_PSK (RFC 6043 4.2.1.1) as hex, MACed with a demo PSK "
            "(bytes 0x00..0x13), Initiator sip:alice@example.org, KMS kms:kms.example.org."
        ),
    )
    e.set_defaults(func=cmd_example)
