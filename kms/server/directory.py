"""The core's Directory port over the registry. Answers are cached until the registry may
have changed: on SQLite per thread, checked on every lookup with ``PRAGMA data_version``
(which changes when any other connection, of any process, commits; so a removed group member
is still refused at once); in cluster mode (PostgreSQL) until the database says the registry
changed (LISTEN/NOTIFY and a generation poll, see kms.server.stores)."""

from __future__ import annotations

import functools
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from kms.core.ports import IntermediateNode, PeerKms, StoreUnavailable
from kms.core.psk_versions import PskVersionRef
from kms.core.revocation import RevocationList
from kms.home import SIGNING_CERT_FILE, SIGNING_LABEL, guess_id_type
from kms.keystore import KeyRef
from kms.store.registry import Registry, RegistryUnavailable, TpkState, UnknownPeer
from kms.store.revocations import RevocationKind

TPK_ID_PREFIX = b"tpk/"
T = TypeVar("T")


_MISS = object()
CACHE_MAX = 50_000

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
    """One registry handle per thread: sqlite3 connections belong to their thread, and the
    gRPC server calls the core from a pool of threads.

    ``generation`` (cluster mode): a function returning a number that changes whenever the
    registry may have changed anywhere in the cluster, or None when that is not known; reads
    are then cached until it changes. Without it (or while it says None), reads are cached
    per thread for as long as the thread's registry connection reports the same
    ``data_version`` (SQLite), and not at all where the registry cannot tell (None).
    """

    def __init__(
        self,
        source: Path | Callable[[], Registry],
        signing_cert: Path | None = None,
        generation: Callable[[], int | None] | None = None,
    ) -> None:
        if isinstance(source, Path):
            path = source
            self._open: Callable[[], Registry] = lambda: Registry.open(path)
            # This KMS's SIGNkms certificate (sent to certificate peers): by default the one
            # `kms init` wrote next to the registry.
            self.signing_cert = signing_cert or path.parent / SIGNING_CERT_FILE
        else:
            if signing_cert is None:
                raise ValueError("a registry opener needs the signing certificate's path")
            self._open = source
            self.signing_cert = signing_cert
        self._local = threading.local()
        self._own_cert: bytes | None = None
        self._generation = generation
        self._cache: dict[tuple[str, bytes], object] = {}
        self._cache_gen: int | None = None
        self._cache_lock = threading.Lock()
        self._open().close()  # fail early, in the caller's thread, if it is missing

    @property
    def registry(self) -> Registry:
        reg: Registry | None = getattr(self._local, "registry", None)
        if reg is None:
            reg = self._open()
            self._local.registry = reg
        return reg

    def _cached(self, kind: str, key: bytes, read: Callable[[], T]) -> T:
        gen = self._generation() if self._generation is not None else None
        if gen is None:
            # No cluster-wide generation (SQLite; or PostgreSQL while not watching, whose
            # data_version is None: read through).
            return self._thread_cached(kind, key, read)
        with self._cache_lock:
            if self._cache_gen != gen:
                self._cache.clear()
                self._cache_gen = gen
            hit = self._cache.get((kind, key), _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        value = read()
        # Kept only if nothing changed while it was read (else the next call reads again).
        if self._generation is not None and self._generation() == gen:
            with self._cache_lock:
                if self._cache_gen == gen:
                    if len(self._cache) >= CACHE_MAX:
                        self._cache.clear()
                    self._cache[(kind, key)] = value
        return value

    def _thread_cached(self, kind: str, key: bytes, read: Callable[[], T]) -> T:
        """Per-thread cache keyed by the thread's own connection's ``PRAGMA data_version``:
        one cheap statement per lookup instead of the query. The version is read before the
        value, so a commit that races the read at worst empties the cache once more."""
        version = self.registry.data_version()
        if version is None:
            return read()
        local = self._local
        cache: dict[tuple[str, bytes], object] | None = getattr(local, "cache", None)
        if cache is None or local.cache_version != version:
            cache = {}
            local.cache = cache
            local.cache_version = version
        hit = cache.get((kind, key), _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        value = read()
        if len(cache) >= CACHE_MAX:
            cache.clear()
        cache[(kind, key)] = value
        return value

    @_store_errors
    def psk_for(self, identity: bytes) -> KeyRef | None:
        return self._cached("psk", identity, lambda: self._psk_for(identity))

    def _psk_for(self, identity: bytes) -> KeyRef | None:
        ep = self.registry.find_endpoint(identity)
        if ep is None or not ep.enabled:
            return None
        return KeyRef(ep.key_label)

    @_store_errors
    def is_member(self, group: bytes, identity: bytes) -> bool:
        key = len(group).to_bytes(4, "big") + group + identity
        return self._cached("member", key, lambda: self.registry.is_member(group, identity))

    @_store_errors
    def is_known(self, identity: bytes) -> bool:
        return self._cached(
            "known",
            identity,
            lambda: (
                self.registry.find_endpoint(identity) is not None
                or self.registry.find_group(identity) is not None
            ),
        )

    @_store_errors
    def current_tpk(self) -> tuple[bytes, KeyRef]:
        tpk = self._cached("tpk_current", b"", self.registry.tpk_current)
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
        for t in self._cached("tpks", b"", self.registry.tpk_versions):
            if t.version == version and t.state in (TpkState.CURRENT, TpkState.ACTIVE):
                return KeyRef(t.key_label)
        return None

    @_store_errors
    def peer(self, kms_id: bytes) -> PeerKms | None:
        return self._cached("peer", kms_id, lambda: self._peer(kms_id))

    def _peer(self, kms_id: bytes) -> PeerKms | None:
        try:
            p = self.registry.get_peer(kms_id)
        except UnknownPeer:
            return None
        envelope: bytes | None = None
        signing: tuple[bytes, ...] = ()
        if p.key_label is None and p.cert_pem:
            envelope, signing = split_peer_certs(p.cert_pem)
        label = p.key_label
        if label is not None and p.send_version != 1:  # `kms peer use-psk`: a rotated version
            label = next((
                v.key_label for v in self.registry.psk_versions(p.kms_id)
                if v.version == p.send_version
            ), None)  # fmt: skip
        return PeerKms(
            kms_id=p.kms_id,
            psk=KeyRef(label) if label else None,
            psk_version=p.send_version,
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
    def node(self, identity: bytes) -> IntermediateNode | None:
        return self._cached("node", identity, lambda: self._node(identity))

    def _node(self, identity: bytes) -> IntermediateNode | None:
        n = self.registry.find_node(identity)
        if n is None:
            return None
        certs: tuple[bytes, ...] = ()
        if n.cert_pem is not None:
            certs = pinned_certs(n.cert_pem)
        return IntermediateNode(
            n.identity,
            n.role.value,
            KeyRef(n.key_label) if n.key_label is not None else None,
            n.initiators,
            n.responders,
            n.groups,
            certs,
        )

    @_store_errors
    def applications(self) -> frozenset[bytes]:
        return self._cached(
            "apps",
            b"",
            lambda: frozenset(a.identity for a in self.registry.list_applications()),
        )

    @_store_errors
    def psk_version(self, name: bytes) -> PskVersionRef | None:
        return self._cached("psk_version", name, lambda: self._psk_version(name))

    def _psk_version(self, name: bytes) -> PskVersionRef | None:
        v = self.registry.find_psk_version(name)
        if v is None:
            return None
        return PskVersionRef(v.identity, v.version, KeyRef(v.key_label), v.retired, v.retire_at)

    @_store_errors
    def revocation_list(self) -> RevocationList:
        """The whole revocation list in one read, once per registry change (cluster mode:
        every revocation write bumps the generation, so replicas drop the cached list;
        SQLite, or PostgreSQL while not watching: as every other lookup, see _cached)."""
        return self._cached("revocations", b"", self._revocation_list)

    def _revocation_list(self) -> RevocationList:
        suspended: set[bytes] = set()
        tickets: set[bytes] = set()
        before: dict[bytes, int] = {}
        for kind, subject, not_before in self.registry.revocation_rows():
            if kind == RevocationKind.SUSPENDED:
                suspended.add(subject)
            elif kind == RevocationKind.TICKET:
                tickets.add(subject)
            else:
                before[subject] = not_before
        return RevocationList(frozenset(suspended), frozenset(tickets), before)


@functools.lru_cache(maxsize=64)
def pinned_certs(cert_pem: str) -> tuple[bytes, ...]:
    """The certificates of a PEM text as DER (a certificate node's pinned certificates)."""
    try:
        certs = x509.load_pem_x509_certificates(cert_pem.encode("ascii"))
    except ValueError:
        return ()
    return tuple(c.public_bytes(Encoding.DER) for c in certs)


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
