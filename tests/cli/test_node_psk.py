"""`kms node rotate-psk | retire-psk | psk-list` on the command line (no server): the verbs
shared with `kms endpoint`, a PSK imported with --psk-file, and the refusals (a certificate
node has no PSK, an endpoint verb does not rotate a node, a file that is both input and
output). The served side is tests/e2e/test_nodes.py."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.cli.conftest import Run
from tests.pki import make_pki

NODE = "sip:recorder@dispatch.example.org"
CERT_NODE = "sip:transcoder@media.example.org"


def test_rotate_with_an_imported_psk_then_retire(
    home: Path, kms: Run, kms_fails: Run, snapshot: Run, tmp_path: Path
) -> None:
    kms(home, "node", "add", NODE, "--role", "recorder", "--psk-hex", "11" * 32)
    new = tmp_path / "new.hex"
    new.write_text("22" * 24 + "\n")
    out = kms(home, "node", "rotate-psk", NODE, "--psk-file", str(new), "--overlap", "3600").stdout
    assert "name (IDRpsk): sip:recorder@dispatch.example.org#psk2" in out and "22" * 24 not in out
    assert "psk:" not in out and "older versions accepted until 20" in out
    listed = json.loads(kms(home, "node", "psk-list", NODE, "--json").stdout)
    assert [(v["version"], v["name"], v["state"]) for v in listed] == [
        (1, NODE, "active"), (2, NODE + "#psk2", "active")]  # fmt: skip
    keys = {k["label"]: k for k in json.loads(kms(home, "keys", "list", "--json").stdout)}
    v2 = keys[listed[1]["key_label"]]
    assert v2["owner"] == f"recorder node {NODE} PSK v2" and v2["bits"] == 192
    assert v2["sensitive"] and not v2["extractable"]
    out = kms(home, "node", "retire-psk", NODE, "1").stdout
    assert f"retired PSK version 1 of {NODE}" in out
    before = snapshot(home)
    kms_fails(home, "node", "retire-psk", NODE, "2", match="only PSK left; rotate first")
    kms_fails(home, "endpoint", "rotate-psk", NODE, match="unknown endpoint|no endpoint")
    kms_fails(home, "node", "rotate-psk", NODE, "--psk-file", str(new), "--out",
              str(tmp_path / "o.hex"), match="exclude each other")  # fmt: skip
    assert snapshot(home) == before
    kms(home, "node", "remove", NODE)  # destroys the live version too
    labels = {k["label"] for k in json.loads(kms(home, "keys", "list", "--json").stdout)}
    assert listed[1]["key_label"] not in labels


def test_certificate_node_has_no_psk_to_rotate(home: Path, kms: Run, kms_fails: Run,
                                               tmp_path: Path) -> None:  # fmt: skip
    pki = make_pki(dt.datetime.now(dt.UTC).replace(microsecond=0))
    _, chain = pki.chain(CERT_NODE.encode())
    pem = tmp_path / "node.pem"
    pem.write_bytes(x509.load_der_x509_certificate(chain[0]).public_bytes(Encoding.PEM))
    kms(home, "node", "add", CERT_NODE, "--role", "transcoder", "--cert", str(pem))
    kms_fails(home, "node", "rotate-psk", CERT_NODE, match="certificate node has no PSK")
    kms_fails(home, "node", "psk-list", "sip:nobody@example.org", match="unknown node")
