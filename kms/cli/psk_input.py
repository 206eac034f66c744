"""Reading a PSK given on the command line as hex (``--psk-hex``) or in a file of hex
(``--psk-file``), for endpoints, peers and ``kms call``, and generating one for a verb that
writes it to a file. Errors never echo the value."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from kms.cli.errors import CliError
from kms.home import PSK_MAX_BYTES, PSK_MIN_BYTES


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


def generate_psk(length: int, out: Path | None, flag: str) -> bytes:
    """A new random PSK of ``length`` bytes for a verb that writes it to ``out`` (given with
    ``flag``) or shows it once; refused before anything happens when the length is out of
    range or ``out`` exists (never overwritten)."""
    if not PSK_MIN_BYTES <= length <= PSK_MAX_BYTES:
        raise CliError(f"--psk-length must be {PSK_MIN_BYTES}..{PSK_MAX_BYTES}")
    if out is not None and out.exists():
        raise CliError(f"{flag} {out}: file exists; not overwriting it")
    return secrets.token_bytes(length)


@contextlib.contextmanager
def psk_file_written(out: Path | None, psk: bytes) -> Iterator[None]:
    """Write ``psk`` as hex to ``out`` (mode 0600, never over an existing file) BEFORE the
    block registers it, so that a registered PSK always exists somewhere the operator can
    hand to the device; the file is removed again when the block fails. No-op for None."""
    if out is None:
        yield
        return
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(psk.hex() + "\n")
    try:
        yield
    except BaseException:
        out.unlink(missing_ok=True)
        raise
