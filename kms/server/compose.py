"""Composition root: builds the KMS core for a KMS home (the only place that chooses the
key store, registry, replay cache and audit sink implementations)."""

from __future__ import annotations

from cryptography.hazmat.primitives.serialization import Encoding

from kms.core.api import KmsHandler
from kms.core.context import Deps, PkAuthenticator
from kms.core.pk import CertificateAuthenticator, EnvelopeKey, load_pem_certificates
from kms.core.policy import Forking, KmsPolicy
from kms.core.ports import PeerResolver
from kms.core.service import Kms
from kms.keystore import KeyRef
from kms.mikey.constants import KeyDataType
from kms.server.config import KmsConfig
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

_KEY_TYPE_NAMES = {
    "tgk": (KeyDataType.TGK, KeyDataType.TGK_SALT),
    "tek": (KeyDataType.TEK, KeyDataType.TEK_SALT),
    "gtgk": (KeyDataType.GTGK, KeyDataType.GTGK_SALT),
}


def kms_policy(config: KmsConfig) -> KmsPolicy:
    """The core's policy from kms.toml ``[policy]``."""
    p = config.policy
    types = frozenset(t for name in p.allowed_key_types for t in _KEY_TYPE_NAMES[name])
    kms_id = config.kms_id_bytes
    return KmsPolicy(
        kms_id=kms_id,
        kms_id_type=guess_id_type(kms_id),
        key_types=types,
        max_lifetime_s=p.max_lifetime_s,
        default_lifetime_s=p.default_lifetime_s,
        forking=Forking(p.forking),
        reuse_allowed=p.reuse_allowed,
        responders_must_be_known=p.responders == "registered",
        timestamp_window_s=p.timestamp_window_s,
    )


def build_handler(
    home: Home, pk: PkAuthenticator | None = None, peers: PeerResolver | None = None
) -> KmsHandler:
    """The KMS core wired to this home's token, registry and stores."""
    config = home.config
    stores = home.stores  # [store] backend: SQLite in the home, or PostgreSQL (cluster)
    deps = Deps(
        keystore=home.keystore(),
        directory=RegistryDirectory(
            stores.open_registry, config.home / SIGNING_CERT_FILE, stores.generation
        ),
        replay=stores.replay_cache(),
        ledger=stores.resolve_ledger(),
        rate=stores.rate_limiter(),
        audit=JsonLinesAuditSink(config.home / AUDIT_LOG),
        policy=kms_policy(config),
        pk=pk,
        peers=peers,
        peer_quota=stores.peer_quota(),
        admission=stores.admission(),
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
            authenticator = CertificateAuthenticator(
                deps,
                roots,
                [EnvelopeKey(KeyRef(ENVELOPE_LABEL), kms_cert.public_bytes(Encoding.DER))],
                pke_padding=config.pk.rsa_padding,
            )
            authenticator.check_envelope_keys()
        except (OSError, ValueError) as exc:
            raise HomeError(f"[pk] cannot be enabled: {exc}") from None
        deps.pk = authenticator
    return Kms(deps)
