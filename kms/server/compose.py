"""Composition root: builds the KMS core for a KMS home (the only place that chooses the
key store, registry, replay cache and audit sink implementations)."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from kms.core.api import KmsHandler
from kms.core.context import Deps, PkAuthenticator
from kms.core.pk import CertificateAuthenticator, EnvelopeKey, load_pem_certificates
from kms.core.policy import Forking, KmsPolicy
from kms.core.ports import PeerResolver
from kms.core.service import Kms
from kms.keystore import KeyExists, KeyNotFound, KeyRef, KeyStore
from kms.mikey.constants import KeyDataType, PrfFunc
from kms.server.config import KmsConfig
from kms.server.crl import CrlStore
from kms.server.directory import RegistryDirectory
from kms.server.home import (
    CERT_FILE,
    ENVELOPE_LABEL,
    SIGNING_CERT_FILE,
    Home,
    HomeError,
    guess_id_type,
)
from kms.server.stores import STATE_DIR
from kms.store.audit import JsonLinesAuditSink

__all__ = ["AUDIT_LOG", "STATE_DIR", "build_handler", "kms_policy"]
AUDIT_LOG = "audit.log"
# A token secret no endpoint knows: MACs of messages from unregistered identities are
# verified against it (same work, same answer as a registered identity with a wrong MAC).
DUMMY_PSK_LABEL = "authn/dummy"
DUMMY_PSK_BYTES = 32

_KEY_TYPE_NAMES = {
    "tgk": (KeyDataType.TGK, KeyDataType.TGK_SALT),
    "tek": (KeyDataType.TEK, KeyDataType.TEK_SALT),
    "gtgk": (KeyDataType.GTGK, KeyDataType.GTGK_SALT),
}


def accepted_prfs(weakest: PrfFunc) -> frozenset[int]:
    """``[policy] prf`` names the weakest PRF the KMS accepts, in message headers and in
    ticket policies: "hmac-sha-1" accepts MIKEY-1 and PRF-HMAC-SHA-256 (RFC 6043 12.1),
    "hmac-sha-256" only PRF-HMAC-SHA-256."""
    if weakest == PrfFunc.PRF_HMAC_SHA_256:
        return frozenset({PrfFunc.PRF_HMAC_SHA_256})
    return frozenset({PrfFunc.MIKEY_1, PrfFunc.PRF_HMAC_SHA_256})


def kms_policy(config: KmsConfig) -> KmsPolicy:
    """The core's policy from kms.toml ``[policy]``."""
    p = config.policy
    types = frozenset(t for name in p.allowed_key_types for t in _KEY_TYPE_NAMES[name])
    kms_id = config.kms_id_bytes
    return KmsPolicy(
        kms_id=kms_id,
        kms_id_type=guess_id_type(kms_id),
        prf_funcs=accepted_prfs(p.prf_func),
        key_types=types,
        max_lifetime_s=p.max_lifetime_s,
        default_lifetime_s=p.default_lifetime_s,
        forking=Forking(p.forking),
        reuse_allowed=p.reuse_allowed,
        responders_must_be_known=p.responders == "registered",
        timestamp_window_s=p.timestamp_window_s,
    )


def dummy_psk(keystore: KeyStore, lock_path: Path) -> KeyRef:
    """The dummy PSK, generated inside the token on first use (it never leaves it)."""
    try:
        keystore.key_info(DUMMY_PSK_LABEL)
        return KeyRef(DUMMY_PSK_LABEL)
    except KeyNotFound:
        pass
    # Several workers may start at once: one creates it, the others find it after a rescan.
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        refresh = getattr(keystore, "refresh", None)
        if callable(refresh):
            refresh()
        try:
            keystore.key_info(DUMMY_PSK_LABEL)
        except KeyNotFound:
            with contextlib.suppress(KeyExists):
                keystore.generate_secret(DUMMY_PSK_LABEL, DUMMY_PSK_BYTES)
    return KeyRef(DUMMY_PSK_LABEL)


# Ticket Requests one worker process can serve per second, with headroom (measured about
# 500/s with SoftHSM, docs/performance.md): what the default replay cache is sized for.
REPLAY_RATE_PER_WORKER = 1000


def replay_capacity(config: KmsConfig, workers: int | None = None) -> int:
    """``[policy] replay_cache_size``, or when 0 (auto): every digest the KMS can accept
    during a digest's lifetime (2 x timestamp_window_s, see check_replay), for
    ``workers`` processes (default ``[server] workers``) at REPLAY_RATE_PER_WORKER each."""
    if config.policy.replay_cache_size:
        return config.policy.replay_cache_size
    n = workers if workers is not None else config.server.workers
    return 2 * config.policy.timestamp_window_s * REPLAY_RATE_PER_WORKER * max(1, n)


def build_handler(
    home: Home,
    pk: PkAuthenticator | None = None,
    peers: PeerResolver | None = None,
    workers: int | None = None,
    keystore: KeyStore | None = None,
) -> KmsHandler:
    """The KMS core wired to this home's token, registry and stores (``keystore``: a
    decorator around ``home.keystore()``, e.g. the metered one, instead of the token)."""
    config = home.config
    stores = home.stores  # [store] backend: SQLite in the home, or PostgreSQL (cluster)
    state = config.home / STATE_DIR
    state.mkdir(mode=0o700, exist_ok=True)
    if keystore is None:
        keystore = home.keystore()
    directory = RegistryDirectory(
        stores.open_registry, config.home / SIGNING_CERT_FILE, stores.generation
    )
    deps = Deps(
        keystore=keystore,
        directory=directory,
        revocations=directory,  # suspended endpoints, revoked tickets (kms revoke)
        psk_versions=directory,  # rotated endpoint PSKs (kms endpoint rotate-psk)
        replay=stores.replay_cache(replay_capacity(config, workers)),
        ledger=stores.resolve_ledger(),
        rate=stores.rate_limiter(),
        audit=JsonLinesAuditSink(
            config.home / AUDIT_LOG, config.audit.max_bytes, config.audit.keep
        ),
        policy=kms_policy(config),
        pk=pk,
        peers=peers,
        peer_quota=stores.peer_quota(),
        admission=stores.admission(),
        dummy_psk=dummy_psk(keystore, state / "dummy-psk.lock"),
    )
    cert_peers = any(p.auth == "cert" for p in home.registry.list_peers())
    if pk is None and (config.pk.ca_bundle is not None or cert_peers):
        # REQUEST_INIT_PK / RESOLVE_INIT_PK (RFC 6043 4.2.1.1, 4.2.3.1): endpoint
        # certificates chain to the [pk] ca_bundle; PKE is encrypted to the envelope key,
        # whose certificate (kms-cert.pem) CHASH names (reference 9). Without a CA bundle,
        # only certificate peer KMSs (pinned certificates) may send them.
        try:
            bundle = config.pk.ca_bundle
            roots = load_pem_certificates(bundle.read_bytes()) if bundle is not None else []
            kms_cert = load_pem_certificates((config.home / CERT_FILE).read_bytes())[0]
            # [pk] crl: revocation for endpoint chains and certificate peers; the store
            # re-reads the CRLs when they change and fails closed when one has expired.
            crls = CrlStore(config.pk.crl) if config.pk.crl is not None else None
            authenticator = CertificateAuthenticator(
                deps,
                roots,
                [EnvelopeKey(KeyRef(ENVELOPE_LABEL), kms_cert.public_bytes(Encoding.DER))],
                pke_padding=config.pk.rsa_padding,
                revocation=crls,
            )
            authenticator.check_envelope_keys()
        except (OSError, ValueError) as exc:
            raise HomeError(f"[pk] cannot be enabled: {exc}") from None
        deps.pk = authenticator
    return Kms(deps)
