"""Reading a PSK given on the command line as hex (``--psk-hex``) or in a file of hex
(``--psk-file``), for endpoints, peers and ``kms call``. Errors never echo the value."""

from __future__ import annotations

import re
from pathlib import Path

from kms.cli.errors import CliError
from kms.server.home import PSK_MAX_BYTES, PSK_MIN_BYTES


def parse_hex_psk(text: str, source: str) -> bytes:
    compact = re.sub(r"\s+", "", text)
    if not compact or len(compact) % 2 or not re.fullmatch(r"[0-9A-Fa-f]+", compact):
        # Never echo the value: it is (meant to be) a secret.
        raise CliError(f"{source}: PSK is not valid hexadecimal")
    psk = bytes.fromhex(compact)
    if not PSK_MIN_BYTES <= len(psk) <= PSK_MAX_BYTES:
        raise CliError(
            f"{source}: PSK must be {PSK_MIN_BYTES}..{PSK_MAX_BYTES} bytes, got {len(psk)}"
        )
    return psk


def read_psk(hex_text: str | None, file: str | None, flag: str) -> bytes:
    """The PSK from ``{flag}-hex`` or ``{flag}-file`` (exactly one is given)."""
    if hex_text is not None:
        return parse_hex_psk(hex_text, f"{flag}-hex")
    assert file is not None
    source = f"{flag}-file {file}"
    try:
        text = Path(file).read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise CliError(f"{source}: PSK is not valid hexadecimal") from None
    except OSError as exc:
        raise CliError(f"{source}: {exc.strerror or type(exc).__name__}") from None
    return parse_hex_psk(text, source)
