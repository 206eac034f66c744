"""One rule for forwarded resolves (RFC 6043 9) from PSK and certificate peers alike: the
issuing KMS limits a peer KMS by its per-peer quota (`kms peer add --rate-limit`), never by
the per-identity rate limit of the end Responder it resolves for (an identity the peer
asserts and whose own KMS rate-limits it)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from hsm.software import SoftwareKeyStore
from kms.core.api import KmsReply, Outcome
from kms.core.context import Authenticated
from kms.core.federation import _forwarded_resolve_init
from kms.core.policy import KmsPolicy
from kms.core.ports import PeerKms
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy, TicketGrant
from kms.endpoint.session import CryptoSession
from kms.keystore import KeyRef
from kms.mikey.compose import compose
from kms.mikey.constants import IdRole, IdType
from kms.mikey.message import Message
from kms.mikey.protect import SUITE_128
from kms.mikey.ticket import Idr, TpFlag
from kms.mikey.views import ResolveInitPsk
from kms.server.compose import build_handler
from kms.store.memory import TokenBucketRateLimiter
from tests.core.pki import Pki
from tests.core.test_crl import BOB_B, PEER_ID, PeerWorld
from tests.core.test_pk import pki  # noqa: F401 - the pki fixture
from tests.core.world import KMS_ID, World, make_world

PEER_PSK = bytes.fromhex("5e" * 16)


def _limit_identities(world: World) -> None:
    deps = world.kms.deps  # type: ignore[attr-defined]
    deps.rate = TokenBucketRateLimiter(1.0, burst=1.0)  # one call per identity per second


def _reusable_grant(world: World) -> TicketGrant:
    flags = DEFAULT_FLAGS | TpFlag.J
    return world.grant(DesiredPolicy((BOB_B,), flags=flags, lifetime_s=600))


def _psk_peer_resolve(world: World, grant: TicketGrant) -> bytes:
    """RESOLVE_INIT_PSK as peer B forwards it (IDRr Bob@b, IDRpsk B, MAC with the key it
    shares with us), built by the same code a forwarding KMS runs."""
    ti, _ = world.initiator().transfer_init(grant, world.now, BOB_B, (CryptoSession(1, 5),))
    bob = SoftwareKeyStore()
    bob.import_secret("peer", PEER_PSK)
    ri, _ = world.responder().receive_transfer_init(ti, world.now)  # any RESOLVE_INIT for T
    view = compose(Message.decode(ri))
    assert isinstance(view, ResolveInitPsk)
    forwarding = SimpleNamespace(
        keystore=bob, policy=KmsPolicy(kms_id=PEER_ID.encode(), kms_id_type=IdType.URI)
    )
    auth = Authenticated(
        Idr(IdRole.IDRR, IdType.URI, BOB_B), KeyRef("peer"), SUITE_128, None, None, b"", "psk"
    )
    fwd, _ = _forwarded_resolve_init(
        view,
        auth,
        forwarding,  # type: ignore[arg-type]
        world.now,
        view.ticket,
        Idr(IdRole.IDRKMS, IdType.URI, KMS_ID),
        PeerKms(PEER_ID.encode(), KeyRef("peer")),
    )
    return fwd.wire


def _outcomes(replies: list[KmsReply]) -> list[Outcome]:
    return [r.outcome for r in replies]


def test_psk_peer_is_limited_by_its_quota_not_the_identity_rate(tmp_path: Path) -> None:
    for world in make_world(tmp_path / "home"):
        world.home.add_peer(
            PEER_ID.encode(), "127.0.0.1:1", psk=PEER_PSK,
            resolve_for=("sip:*@b.example",), rate_limit=1.0,
        )  # fmt: skip
        world.kms = build_handler(world.home)
        _limit_identities(world)
        grant = _reusable_grant(world)
        replies = [world.resolve(_psk_peer_resolve(world, grant)) for _ in range(3)]
        assert _outcomes(replies) == [Outcome.OK, Outcome.OK, Outcome.RATE_LIMITED], [
            r.audit.get("reason") for r in replies
        ]
        assert replies[0].audit["method"] == "peer"
        assert replies[2].audit["reason"] == "peer quota exceeded"


def test_certificate_peer_is_limited_by_its_quota_not_the_identity_rate(
    tmp_path: Path,
    pki: Pki,  # noqa: F811
) -> None:
    for world in make_world(tmp_path / "home"):
        pw = PeerWorld(world, pki, None, rate_limit=1.0)  # peer quota: 1/s, bursts of 2
        _limit_identities(world)
        grant = _reusable_grant(world)
        replies = [world.resolve(pw.forwarded_resolve(grant)) for _ in range(3)]  # same second
        # Two forwarded resolves for Bob@b pass (the identity rate would stop the second);
        # the third meets the peer's quota.
        assert _outcomes(replies) == [Outcome.OK, Outcome.OK, Outcome.RATE_LIMITED]
        assert replies[2].audit["reason"] == "peer quota exceeded"
