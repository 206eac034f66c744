"""The core's Directory port over the registry (SQLite). Reads per request, no caching of
group membership: a removed member is refused at once (issue 4)."""

from __future__ import annotations

import functools
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from kms.core.ports import PeerKms, StoreUnavailable
from kms.keystore import KeyRef
from kms.server.home import SIGNING_CERT_FILE, SIGNING_LABEL, guess_id_type
from kms.store.registry import Registry, RegistryUnavailable, TpkState, UnknownPeer

TPK_ID_PREFIX = b"tpk/"

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _store_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """A registry that cannot answer (locked past the busy timeout, deleted, corrupt) is
    the core's StoreUnavailable: the call is refused as UNAVAILABLE and audited."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except (sqlite3.Error, RegistryUnavailable) as exc:
            raise StoreUnavailable(f"registry: {type(exc).__name__}") from None

    return wrapper


class RegistryDirectory:
    """One registry connection per thread: sqlite3 connections belong to their thread, and the
    gRPC server calls the core from a pool of threads."""

    def __init__(self, path: Path, signing_cert: Path | None = None) -> None:
        self.path = path
        # This KMS's SIGNkms certificate (sent to certificate peers): by default the one
        # `kms init` wrote next to the registry.
        self.signing_cert = signing_cert or path.parent / SIGNING_CERT_FILE
        self._local = threading.local()
        self._own_cert: bytes | None = None
        Registry.open(path).close()  # fail early, in the caller's thread, if it is missing

    @property
    def registry(self) -> Registry:
        reg: Registry | None = getattr(self._local, "registry", None)
        if reg is None:
            reg = Registry.open(self.path)
            self._local.registry = reg
        return reg

    @_store_errors
    def psk_for(self, identity: bytes) -> KeyRef | None:
        ep = self.registry.find_endpoint(identity)
        if ep is None or not ep.enabled:
            return None
        return KeyRef(ep.key_label)

    @_store_errors
    def is_member(self, group: bytes, identity: bytes) -> bool:
        return self.registry.is_member(group, identity)

    @_store_errors
    def is_known(self, identity: bytes) -> bool:
        return (
            self.registry.find_endpoint(identity) is not None
            or self.registry.find_group(identity) is not None
        )

    @_store_errors
    def current_tpk(self) -> tuple[bytes, KeyRef]:
        tpk = self.registry.tpk_current()
        if tpk is None:
            raise LookupError("no current TPK: run `kms init`")
        return tpk.key_label.encode("ascii"), KeyRef(tpk.key_label)

    @_store_errors
    def tpk(self, tpk_id: bytes) -> KeyRef | None:
        # IDRpsk in a base ticket carries the TPK's token label, e.g. b"tpk/3".
        if not tpk_id.startswith(TPK_ID_PREFIX):
            return None
        try:
            version = int(tpk_id[len(TPK_ID_PREFIX) :].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        for t in self.registry.tpk_versions():
            if t.version == version and t.state in (TpkState.CURRENT, TpkState.ACTIVE):
                return KeyRef(t.key_label)
        return None

    @_store_errors
    def peer(self, kms_id: bytes) -> PeerKms | None:
        try:
            p = self.registry.get_peer(kms_id)
        except UnknownPeer:
            return None
        envelope: bytes | None = None
        signing: tuple[bytes, ...] = ()
        if p.key_label is None and p.cert_pem:
            envelope, signing = split_peer_certs(p.cert_pem)
        return PeerKms(
            kms_id=p.kms_id,
            psk=KeyRef(p.key_label) if p.key_label else None,
            resolve_for=p.resolve_for,
            rate_per_s=p.rate_limit,
            deadline_s=p.deadline_ms / 1000.0,
            kms_id_type=guess_id_type(p.kms_id),
            envelope_cert_der=envelope,
            signing_certs_der=signing,
            local_signing_key=KeyRef(SIGNING_LABEL) if envelope is not None else None,
            local_signing_cert_der=self._own_signing_cert() if envelope is not None else None,
        )

    def _own_signing_cert(self) -> bytes | None:
        if self._own_cert is None:
            try:
                certs = x509.load_pem_x509_certificates(self.signing_cert.read_bytes())
            except (OSError, ValueError):
                return None
            self._own_cert = certs[0].public_bytes(Encoding.DER)
        return self._own_cert

    @_store_errors
    def applications(self) -> frozenset[bytes]:
        return frozenset(a.identity for a in self.registry.list_applications())


@functools.lru_cache(maxsize=64)
def split_peer_certs(cert_pem: str) -> tuple[bytes | None, tuple[bytes, ...]]:
    """A certificate peer's `--cert` PEM (its kms-cert.pem and kms-signing-cert.pem): (the
    envelope certificate, keyUsage keyEncipherment; the signing certificates, keyUsage
    digitalSignature), as DER. A certificate without keyUsage counts as both."""
    try:
        certs = x509.load_pem_x509_certificates(cert_pem.encode("ascii"))
    except ValueError:
        return None, ()
    envelope: bytes | None = None
    signing: list[bytes] = []
    for cert in certs:
        der = cert.public_bytes(Encoding.DER)
        try:
            usage: x509.KeyUsage | None = cert.extensions.get_extension_for_class(
                x509.KeyUsage
            ).value
        except x509.ExtensionNotFound:
            usage = None
        if envelope is None and (usage is None or usage.key_encipherment):
            envelope = der
        if usage is None or usage.digital_signature:
            signing.append(der)
    return envelope, tuple(signing)
