"""`kms peer rotate-psk | use-psk | retire-psk | psk-list | set` on the command line (no
server): the new version's token object (sensitive, non-extractable, fresh label), refused
operations that change nothing, an unknown peer, and `peer remove` destroying every version.
The served side, with two live domains, is tests/federation/test_peer_rotation.py."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import Run

PEER = "kms:b.example.org"


def test_rotate_use_retire_then_remove(
    home: Path, kms: Run, kms_fails: Run, snapshot: Run, tmp_path: Path
) -> None:
    kms(home, "peer", "add", PEER, "--address", "127.0.0.1:50062", "--psk-hex", "ab" * 32)
    listed = json.loads(kms(home, "peer", "psk-list", PEER, "--json").stdout)
    assert [(v["version"], v["name"], v["state"], v["sending"]) for v in listed] == [
        (1, PEER, "active", True)
    ]
    v1_label = listed[0]["key_label"]
    new = tmp_path / "new.hex"
    new.write_text("cd" * 32 + "\n")
    out = kms(home, "peer", "rotate-psk", PEER, "--psk-file", str(new)).stdout
    assert "new version 2 of the shared key" in out and f"its IDRpsk {PEER}#psk2" in out
    assert "this KMS still sends with version 1" in out and "cd" * 16 not in out
    listed = json.loads(kms(home, "peer", "psk-list", PEER, "--json").stdout)
    assert [(v["version"], v["name"], v["sending"]) for v in listed] == [
        (1, PEER, True), (2, PEER + "#psk2", False),
    ]  # fmt: skip
    v2_label = listed[1]["key_label"]
    assert v2_label != v1_label and v2_label.startswith("peer/")
    keys = {k["label"]: k for k in json.loads(kms(home, "keys", "list", "--json").stdout)}
    assert keys[v2_label]["owner"] == f"peer {PEER} PSK v2" and keys[v2_label]["bits"] == 256
    assert keys[v2_label]["sensitive"] and not keys[v2_label]["extractable"]
    before = snapshot(home)
    kms_fails(home, "peer", "retire-psk", PEER, "1", match="the one this KMS sends with")
    kms_fails(home, "peer", "use-psk", PEER, "3", match="no PSK version 3")
    kms_fails(home, "peer", "rotate-psk", PEER, "--psk-hex", "ef" * 32, "--version", "1",
              match="--version must be >= 2")  # fmt: skip
    kms_fails(home, "peer", "rotate-psk", "kms:nobody.example", "--psk-hex", "ef" * 32,
              match="unknown peer KMS kms:nobody.example")  # fmt: skip
    kms_fails(home, "peer", "use-psk", "kms:nobody.example", "1", match="unknown peer KMS")
    assert snapshot(home) == before
    kms(home, "peer", "use-psk", PEER, "2")
    assert json.loads(kms(home, "peer", "list", "--json").stdout)[0]["send_version"] == 2
    out = kms(home, "peer", "retire-psk", PEER, "1").stdout
    assert f"retired version 1 of the key shared with peer KMS {PEER}" in out
    labels = {k["label"] for k in json.loads(kms(home, "keys", "list", "--json").stdout)}
    assert v1_label not in labels and v2_label in labels
    kms_fails(home, "peer", "retire-psk", PEER, "2", match="the one this KMS sends with")
    out = kms(home, "peer", "remove", PEER).stdout
    labels = {k["label"] for k in json.loads(kms(home, "keys", "list", "--json").stdout)}
    assert v2_label not in labels  # the live version is destroyed with the peer


def test_set_refusals_change_nothing(
    home: Path, kms: Run, kms_fails: Run, snapshot: Run, tmp_path: Path
) -> None:
    kms(home, "peer", "add", PEER, "--address", "127.0.0.1:50062", "--psk-hex", "ab" * 32,
        "--resolve-for", "sip:*@b.example.org")  # fmt: skip
    before = snapshot(home)
    kms_fails(home, "peer", "set", PEER, match="nothing to change")
    kms_fails(home, "peer", "set", PEER, "--rate", "-1", match="--rate must be >= 0")
    kms_fails(home, "peer", "set", PEER, "--deadline-ms", "0", match="--deadline-ms must be")
    kms_fails(home, "peer", "set", PEER, "--address", "no-port", match="--address no-port")
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("hello")
    kms_fails(home, "peer", "set", PEER, "--ca", str(not_pem), match="not a PEM certificate")
    assert snapshot(home) == before
    out = kms(home, "peer", "set", PEER, "--address", "kms-b.example.org:50062").stdout
    assert "address kms-b.example.org:50062" in out and "sip:*@b.example.org" in out
