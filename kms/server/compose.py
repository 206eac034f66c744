"""Composition root: builds the KMS core for a KMS home (the only place that chooses the
key store, registry, replay cache and audit sink implementations)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from cryptography.hazmat.primitives.serialization import Encoding

from kms.core.api import KmsHandler
from kms.core.context import Deps, PkAuthenticator
from kms.core.pk import CertificateAuthenticator, EnvelopeKey, load_pem_certificates
from kms.core.policy import Forking, KmsPolicy
from kms.core.ports import PeerResolver, ReplayCache
from kms.core.service import Kms
from kms.home import (
    CERT_FILE,
    DUMMY_PSK_LABEL,
    ENVELOPE_LABEL,
    FORK_MODIFIER_BYTES,
    FORK_MODIFIER_LABEL,
    SIGNING_CERT_FILE,
    Home,
    HomeError,
    guess_id_type,
)
from kms.keystore import KeyExists, KeyNotFound, KeyRef, KeyStore, KeyStoreError
from kms.mikey.constants import KeyDataType, PrfFunc
from kms.server.config import KmsConfig
from kms.server.crl import CrlStore
from kms.server.directory import RegistryDirectory
from kms.server.federated import FederatingHandler
from kms.server.key_rescan import RescanOnFirstMiss
from kms.server.settings import IntermediateNodes, KeyTypeName, Responders
from kms.server.slots import CoreSlots
from kms.server.stores import STATE_DIR
from kms.store.audit import JsonLinesAuditSink

__all__ = ["AUDIT_LOG", "STATE_DIR", "build_handler", "kms_policy"]
AUDIT_LOG = "audit.log"
# A token secret no endpoint knows: MACs of messages from unregistered identities are
# verified against it (same work, same answer as a registered identity with a wrong MAC).
DUMMY_PSK_BYTES = 32
# Creations of a KMS-wide secret that a rescan must find before start-up gives up.
SECRET_CREATE_TRIES = 3

# [policy] allowed_key_types -> the Key Data types issued (RFC 3830 6.13, RFC 6043 6.13).
_KEY_TYPES: dict[KeyTypeName, tuple[KeyDataType, KeyDataType]] = {
    KeyTypeName.TGK: (KeyDataType.TGK, KeyDataType.TGK_SALT),
    KeyTypeName.TEK: (KeyDataType.TEK, KeyDataType.TEK_SALT),
    KeyTypeName.GTGK: (KeyDataType.GTGK, KeyDataType.GTGK_SALT),
}


def accepted_prfs(weakest: PrfFunc) -> frozenset[int]:
    """``[policy] prf`` names the weakest PRF the KMS accepts, in message headers and in
    ticket policies: "hmac-sha-1" accepts MIKEY-1 and PRF-HMAC-SHA-256 (RFC 6043 12.1),
    "hmac-sha-256" only PRF-HMAC-SHA-256."""
    if weakest == PrfFunc.PRF_HMAC_SHA_256:
        return frozenset({PrfFunc.PRF_HMAC_SHA_256})
    return frozenset({PrfFunc.MIKEY_1, PrfFunc.PRF_HMAC_SHA_256})


def kms_policy(config: KmsConfig) -> KmsPolicy:
    """The core's policy from kms.toml ``[policy]`` (every key of the section that the core
    uses; the others size the replay cache and rate limiter around it)."""
    p = config.policy
    types = frozenset(t for name in p.allowed_key_types for t in _KEY_TYPES[KeyTypeName(name)])
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
        responders_must_be_known=p.responders == Responders.REGISTERED,
        timestamp_window_s=p.timestamp_window_s,
        intermediate_nodes=p.intermediate_nodes == IntermediateNodes.ALLOWED,
    )


def dummy_psk(
    keystore: KeyStore, lock: Callable[[], contextlib.AbstractContextManager[None]]
) -> KeyRef:
    """The dummy PSK, generated inside the token on first use (it never leaves it)."""
    return ensure_secret(keystore, DUMMY_PSK_LABEL, DUMMY_PSK_BYTES, lock)


def ensure_secret(
    keystore: KeyStore,
    label: str,
    length: int,
    lock: Callable[[], contextlib.AbstractContextManager[None]],
) -> KeyRef:
    """A KMS-wide token secret (the dummy PSK, the forking modifier key), generated inside
    the token on first use if the home was made before it existed (it never leaves it).

    Several workers, and in cluster mode several replicas sharing the token, may start at
    once: under ``lock`` (``Stores.token_lock``: a lock file, or a PostgreSQL advisory lock
    across replicas) one creates it, the others find it after a rescan of the token."""
    try:
        keystore.key_info(label)
        return KeyRef(label)
    except KeyNotFound:
        pass
    with lock():
        refresh = getattr(keystore, "refresh", None)
        rescan: Callable[[], object] = refresh if callable(refresh) else (lambda: None)
        rescan()
        for made in range(SECRET_CREATE_TRIES + 1):
            try:
                keystore.key_info(label)
                return KeyRef(label)
            except KeyNotFound:
                if made == SECRET_CREATE_TRIES:
                    break
            with contextlib.suppress(KeyExists):
                keystore.generate_secret(label, length)
            # SoftHSM 2.6.1 can lose the label of an object created while another process
            # uses the token (docs/design.md): a rescan, still under the lock, makes sure
            # every process will find this one, else it is made again.
            rescan()
    raise HomeError(f"token secret {label!r} was created but is not found under its label "
                    "(another process using the token at the same moment?); start again")


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


def pk_authenticator(home: Home, deps: Deps) -> PkAuthenticator | None:
    """REQUEST_INIT_PK / RESOLVE_INIT_PK (RFC 6043 4.2.1.1, 4.2.3.1): endpoint certificates
    chain to the [pk] ca_bundle; PKE is encrypted to the envelope key, whose certificate
    (kms-cert.pem) CHASH names (RFC 3830 6.8). Without a CA bundle, only certificate peer
    KMSs and certificate nodes (pinned certificates, looked up per request) may send them,
    and endpoints get "public-key messages are not enabled", as without an authenticator.

    Built whenever the home has its envelope key and certificate (`kms init` makes both),
    so that a certificate peer or node registered while `kms serve` runs is served without
    a restart. A failure is fatal only when PK is needed now (a CA bundle, or a certificate
    peer or node registered); otherwise the KMS runs without the PK path (None)."""
    config = home.config
    cert_peers = any(p.auth == "cert" for p in home.registry.list_peers())
    # Certificate nodes (kms node add --cert) send RESOLVE_INIT_PK too (RFC 6043 11.1).
    cert_peers = cert_peers or any(n.cert_pem for n in home.registry.list_nodes())
    needed = config.pk.ca_bundle is not None or cert_peers
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
        if needed:
            raise HomeError(f"[pk] cannot be enabled: {exc}") from None
        return None
    except KeyStoreError:  # the envelope key missing from the token
        if needed:
            raise
        return None
    return authenticator


def build_handler(
    home: Home,
    pk: PkAuthenticator | None = None,
    peers: PeerResolver | None = None,
    workers: int | None = None,
    keystore: KeyStore | None = None,
    wrap_replay: Callable[[ReplayCache], ReplayCache] | None = None,
    slots: CoreSlots | None = None,
) -> KmsHandler:
    """The KMS core wired to this home's token, registry and stores (``keystore``: a
    decorator around ``home.keystore()``, e.g. the metered one, instead of the token;
    ``wrap_replay``: a decorator for the replay cache, e.g. the metered one).
    With ``peers``, tickets of peer KMSs are resolved by asking them (RFC 6043 9), without
    holding one of ``slots`` while the peer answers."""
    config = home.config
    stores = home.stores  # [store] backend: SQLite in the home, or PostgreSQL (cluster)
    state = config.home / STATE_DIR
    state.mkdir(mode=0o700, exist_ok=True)
    if keystore is None:
        keystore = home.keystore()
    replay = stores.replay_cache(replay_capacity(config, workers))
    if wrap_replay is not None:
        replay = wrap_replay(replay)
    directory = RegistryDirectory(
        stores.open_registry, config.home / SIGNING_CERT_FILE, stores.generation
    )
    def fork_lock() -> contextlib.AbstractContextManager[None]:
        return stores.token_lock("fork-modifier")

    deps = Deps(
        # A key the registry names but the catalogue lacks (made by `kms node add` etc.
        # while serving) is rescanned for on its first miss, whatever other misses happened.
        keystore=RescanOnFirstMiss(keystore),
        directory=directory,
        revocations=directory,  # suspended endpoints, revoked tickets (kms revoke)
        psk_versions=directory,  # rotated PSKs of endpoints, nodes and peer KMSs (rotate-psk)
        replay=replay,
        ledger=stores.resolve_ledger(),
        rate=stores.rate_limiter(),
        audit=JsonLinesAuditSink(
            config.home / AUDIT_LOG, config.audit.max_bytes, config.audit.keep
        ),
        policy=kms_policy(config),
        pk=pk,
        federation=peers is not None,
        peer_quota=stores.peer_quota(),
        admission=stores.admission(),
        dummy_psk=dummy_psk(keystore, lambda: stores.token_lock("dummy-psk")),
        nodes=directory,  # intermediate nodes (kms node add, RFC 6043 11.1)
        fork_modifier=ensure_secret(
            keystore, FORK_MODIFIER_LABEL, FORK_MODIFIER_BYTES, fork_lock
        ),
    )
    if pk is None:
        deps.pk = pk_authenticator(home, deps)
    core = Kms(deps)
    if peers is None:
        return core
    return FederatingHandler(core, peers, slots)
