"""``kms mikey decode`` and ``kms mikey example``, run as real processes."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mikey.strategies import fixture

REPO = Path(__file__).resolve().parents[2]
REQUEST = fixture("request_init_psk")


def kms(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "kms.cli", "mikey", *args],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def ok(*args: str, stdin: bytes | None = None) -> str:
    proc = kms(*args, stdin=stdin)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    return proc.stdout.decode()


def fails(*args: str, stdin: bytes | None = None) -> str:
    proc = kms(*args, stdin=stdin)
    assert proc.returncode == 1, proc.stdout.decode()
    err = proc.stderr.decode()
    assert "Traceback" not in err
    assert proc.stdout == b""
    return err


def test_example_piped_into_decode() -> None:
    example = kms("example")
    assert example.returncode == 0
    hexline = example.stdout.decode().strip()
    assert hexline.startswith("010b05")  # version 1, REQUEST_INIT_PSK, next payload T
    out = ok("decode", "-", stdin=example.stdout)
    assert out.startswith(f"MIKEY message ({len(hexline) // 2} bytes)\n")
    assert "    data type: REQUEST_INIT_PSK (11)\n" in out
    assert "ID Role: IDRkms (3)" in out
    assert "flags: F H L N O" in out


def test_example_mac_is_the_demo_psk_hmac() -> None:
    import hashlib
    import hmac

    wire = bytes.fromhex(kms("example").stdout.decode())
    mac_input = wire[:-20] + b"sip:alice@example.org" + b"kms:kms.example.org"
    assert wire[-20:] == hmac.new(bytes(range(20)), mac_input, hashlib.sha1).digest()


@pytest.mark.parametrize(
    ("label", "arg"),
    [
        ("hex", REQUEST.hex()),
        ("HEX with 0x and colons", "0x" + ":".join(f"{b:02X}" for b in REQUEST)),
        ("base64", base64.b64encode(REQUEST).decode()),
        ("base64url unpadded", base64.urlsafe_b64encode(REQUEST).decode().rstrip("=")),
        ("sdp", "a=key-mgmt:mikey " + base64.b64encode(REQUEST).decode()),
    ],
)
def test_decode_argument_forms(label: str, arg: str) -> None:
    out = ok("decode", arg)
    assert "data type: REQUEST_INIT_PSK (11)" in out, label
    assert "CSB ID: 0x12345678" in out


def test_decode_files_binary_hex_and_base64(tmp_path: Path) -> None:
    binary = tmp_path / "m.bin"
    binary.write_bytes(REQUEST)
    hexfile = tmp_path / "m.hex"
    hexfile.write_text(REQUEST.hex()[:100] + "\n" + REQUEST.hex()[100:] + "\n")
    b64file = tmp_path / "m.b64"
    b64file.write_text(base64.encodebytes(REQUEST).decode())  # wrapped at 76 columns
    outs = {ok("decode", str(p)) for p in (binary, hexfile, b64file)}
    assert len(outs) == 1
    assert ok("decode", "--format", "raw", str(binary)) in outs


def test_decode_stdin_default_and_formats() -> None:
    assert "REQUEST_INIT_PSK" in ok("decode", stdin=REQUEST)  # INPUT defaults to -
    assert "REQUEST_INIT_PSK" in ok("decode", "--format", "raw", "-", stdin=REQUEST)
    assert "REQUEST_INIT_PSK" in ok("decode", "--format", "hex", "-", stdin=REQUEST.hex().encode())
    b64 = base64.b64encode(REQUEST)
    assert "REQUEST_INIT_PSK" in ok("decode", "--format", "base64", "-", stdin=b64)
    err = fails("decode", "--format", "hex", "-", stdin=b64)
    assert err == "kms: error: input: standard input is not hex\n"


def test_decode_json() -> None:
    out = ok("decode", "--json", REQUEST.hex())
    j = json.loads(out)
    assert j["length"] == len(REQUEST)
    assert j["HDR"]["data type"] == {"value": 11, "name": "REQUEST_INIT_PSK"}
    assert j["HDR"]["CSB ID"] == "12345678"
    assert [p["payload"] for p in j["payloads"]] == ["T", "RANDR", "IDR", "IDR", "TP", "IDR", "V"]
    assert j["payloads"][-1]["Ver data"] == "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3"


def test_decode_ticket_message_shows_base_ticket() -> None:
    out = ok("decode", fixture("request_resp").hex())
    assert "    Ticket Data (88 bytes)\n" in out
    assert "      MIKEY base ticket\n" in out
    assert "Encr data (25 bytes): 948e54d17b3625064f9d4476457465bf8c352df796480a57d9" in out


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (
            REQUEST[:-3],
            "kms: error: decode: V at offset 175: truncated: Ver data needs 20 byte(s), 17 left\n",
        ),
        (
            REQUEST + b"\x00",
            "kms: error: decode: V at offset 195: 1 trailing byte(s) after the last payload\n",
        ),
        (
            b"\x02" + REQUEST[1:],
            "kms: error: decode: HDR at offset 0: unsupported MIKEY version 2\n",
        ),
    ],
)
def test_malformed_message_is_one_line_exit_1(wire: bytes, expected: str) -> None:
    assert fails("decode", wire.hex()) == expected


def test_bad_input_is_one_line_exit_1(tmp_path: Path) -> None:
    assert (
        fails("decode", "not-hex!")
        == "kms: error: input: 'not-hex!' is not a file, hex or base64\n"
    )
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert fails("decode", str(empty)) == f"kms: error: input: {empty} is empty\n"
    assert fails("decode", "-", stdin=b"") == "kms: error: input: standard input is empty\n"


def test_help_explains_inputs_and_errors() -> None:
    out = ok("decode", "--help")
    for words in (
        "INPUT",
        "--format",
        "{auto,hex,base64,raw}",
        "--json",
        "stdin",
        "base64",
        "kms mikey example | kms mikey decode -",
        "at offset N",
    ):
        assert words in out
    assert "example" in ok("--help")


def test_a_reader_that_left_is_no_traceback() -> None:
    """``kms ... | head``: the reader closes the pipe before the command writes. One exit
    status (128 + SIGPIPE, as a shell reports it) and nothing on stderr."""
    p = subprocess.Popen(
        [sys.executable, "-m", "kms.cli", "mikey", "example"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # before the interpreter has even started
    err = p.stderr.read()
    assert p.wait(timeout=60) == 128 + signal.SIGPIPE
    assert err == b""
