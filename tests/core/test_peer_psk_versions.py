"""Which key shared with a peer KMS a forwarded RESOLVE_INIT_PSK's IDRpsk names (RFC 6043 9,
4.2.3: "used to indicate the pre-shared key used"), on the core alone: the bare KMS id
(version 1, or a peer that never rotated), ``<kms id>#psk<N>``, a retired or unknown version
(key None: refused like a wrong MAC), and names that are no peer's."""

from __future__ import annotations

import pytest

from kms.core.ports import PeerKms
from kms.core.psk_versions import PskVersionRef, peer_psk, split_version_name, version_name
from kms.keystore import KeyRef

PEER = b"kms:b.example"
CERT_PEER = b"kms:c.example"
ALICE = b"sip:alice@a.example"


class Peers:
    """The two ports peer_psk reads: peers by KMS id, PSK versions by IDRpsk name."""

    def __init__(self) -> None:
        self.peers = {
            PEER: PeerKms(PEER, KeyRef("peer/v2"), psk_version=2),
            CERT_PEER: PeerKms(CERT_PEER, None),
        }
        self.rows: dict[bytes, PskVersionRef] = {}

    def peer(self, kms_id: bytes) -> PeerKms | None:
        return self.peers.get(kms_id)

    def psk_for(self, identity: bytes) -> KeyRef | None:
        return None

    def psk_version(self, name: bytes) -> PskVersionRef | None:
        return self.rows.get(name)


NOW = 1_000_000.0


@pytest.fixture
def ports() -> Peers:
    p = Peers()
    p.rows[PEER] = PskVersionRef(PEER, 1, KeyRef("peer/v1"), True, None)  # retired
    p.rows[PEER + b"#psk2"] = PskVersionRef(PEER, 2, KeyRef("peer/v2"), False, None)
    p.rows[ALICE + b"#psk2"] = PskVersionRef(ALICE, 2, KeyRef("psk/alice-2"), False, None)
    return p


def test_a_live_version_names_its_key(ports: Peers) -> None:
    got = peer_psk(PEER + b"#psk2", ports, ports, NOW)  # type: ignore[arg-type]
    assert got is not None and (got.peer.kms_id, got.key, got.version) == (
        PEER, KeyRef("peer/v2"), 2,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "reason", "version"),
    [
        (PEER, "PSK version 1 retired", 1),
        (PEER + b"#psk9", "unknown PSK version 9", 9),
    ],
)
def test_retired_and_unknown_versions_have_no_key(
    ports: Peers, name: bytes, reason: str, version: int
) -> None:
    got = peer_psk(name, ports, ports, NOW)  # type: ignore[arg-type]
    assert got is not None and got.peer.kms_id == PEER
    assert (got.key, got.reason, got.version) == (None, reason, version)


def test_a_version_past_its_overlap_is_refused(ports: Peers) -> None:
    ports.rows[PEER + b"#psk2"] = PskVersionRef(PEER, 2, KeyRef("peer/v2"), False, int(NOW))
    got = peer_psk(PEER + b"#psk2", ports, ports, NOW)  # type: ignore[arg-type]
    assert got is not None and got.key is None and got.reason == "PSK version 2 retired"


def test_a_peer_that_never_rotated_uses_its_registered_key() -> None:
    ports = Peers()
    ports.peers[PEER] = PeerKms(PEER, KeyRef("peer/only"))
    got = peer_psk(PEER, ports, ports, NOW)  # type: ignore[arg-type]
    assert got is not None and (got.key, got.version) == (KeyRef("peer/only"), None)
    assert peer_psk(PEER, None, ports, NOW) == got  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    [
        ALICE,  # an endpoint
        ALICE + b"#psk2",  # an endpoint's version
        b"kms:nobody.example#psk2",  # no such peer
        CERT_PEER + b"#psk2",  # a certificate peer has no versions
        PEER + b"#psk",
        PEER + b"#psk02",
        PEER + b"#psk1",
        PEER + b"#psk" + b"9" * 40,
    ],
)
def test_names_that_are_no_peers(ports: Peers, name: bytes) -> None:
    assert peer_psk(name, ports, ports, NOW) is None  # type: ignore[arg-type]


def test_certificate_peer_by_its_id_is_still_found(ports: Peers) -> None:
    got = peer_psk(CERT_PEER, ports, ports, NOW)  # type: ignore[arg-type]
    assert got is not None and got.key is None and got.peer.psk is None


@pytest.mark.parametrize(
    ("name", "split"),
    [
        (b"kms:a#psk2", (b"kms:a", 2)),
        (b"kms:a#psk12", (b"kms:a", 12)),
        (b"kms:a#psk2#psk3", (b"kms:a#psk2", 3)),
        (b"kms:a", None),
        (b"#psk2", None),
        (b"kms:a#psk1", None),
        (b"kms:a#psk-2", None),
        (b"kms:a#pskx", None),
    ],
)
def test_split_version_name(name: bytes, split: tuple[bytes, int] | None) -> None:
    assert split_version_name(name) == split
    if split is not None:
        assert version_name(*split) == name
