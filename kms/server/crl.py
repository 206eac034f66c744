"""Certificate revocation lists for PK endpoints and certificate peers (``[pk] crl``).

``[pk] crl`` names a CRL file (PEM with one or more CRLs, or DER) or a folder of them
(every regular file not starting with "."; each must be a CRL, so that a truncated download
fails closed instead of being skipped). The set is re-read whenever a file's size, mtime or
inode changes, or a file appears or disappears; that is checked on every call, so a new CRL
takes effect on the next PK message.

Rules (RFC 5280 6.3, reduced to what the KMS needs):

* A certificate whose issuer (by name) has no CRL here is not checked: GOOD.
* A CRL counts only if its signature verifies with the key of a certificate that may have
  issued the certificate (the next certificate of the validated chain, a configured CA, or
  the certificate itself when it is self-issued); a CRL naming the issuer that no such key
  verifies makes the status UNKNOWN (never ignored: that would fail open).
* The newest such CRL (thisUpdate) must not be past its nextUpdate (a CRL without
  nextUpdate never expires): else UNKNOWN. The KMS fails closed.
* The serial number listed in any such CRL: REVOKED.
* An unreadable or unparsable CRL file: UNKNOWN for every certificate until it is fixed.

Only ``cryptography``'s x509 API parses CRLs (no hand-written ASN.1).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from kms.core.ports import Revocation

log = logging.getLogger("kms.server.crl")

Fingerprint = tuple[tuple[str, int, int, int], ...]
MAX_VERIFIED = 4096  # remembered (CRL, issuer) signature checks per loaded set


class CrlError(ValueError):
    """The configured CRL path cannot be used; one line."""


@dataclass(frozen=True)
class _Crl:
    crl: x509.CertificateRevocationList
    serials: frozenset[int]  # revoked serial numbers, read once per load (a set lookup)


@dataclass(frozen=True)
class _Loaded:
    crls: tuple[_Crl, ...]
    error: str | None  # set: the set could not be read; every check is UNKNOWN
    # (index in crls, issuer certificate fingerprint) -> whether its key verifies that CRL
    verified: dict[tuple[int, bytes], bool] = field(default_factory=dict)


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return [path]


def _fingerprint(path: Path) -> Fingerprint:
    out = []
    for f in _files(path):
        st = f.stat()
        out.append((f.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def parse_crls(data: bytes, name: str) -> list[x509.CertificateRevocationList]:
    """Every CRL of a PEM file (one or more ``X509 CRL`` blocks) or the CRL of a DER file."""
    if b"-----BEGIN" not in data:
        try:
            return [x509.load_der_x509_crl(data)]
        except ValueError:
            raise CrlError(f"{name}: not a DER or PEM CRL") from None
    out = []
    marker = b"-----BEGIN X509 CRL-----"
    for part in data.split(marker)[1:]:
        end = part.find(b"-----END X509 CRL-----")
        if end < 0:
            raise CrlError(f"{name}: truncated PEM CRL")
        block = marker + part[: end + len(b"-----END X509 CRL-----")] + b"\n"
        try:
            out.append(x509.load_pem_x509_crl(block))
        except ValueError:
            raise CrlError(f"{name}: malformed PEM CRL") from None
    if not out:
        raise CrlError(f"{name}: no X509 CRL block")
    return out


def _verifies(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        return False
    try:
        return crl.is_signature_valid(key)
    except (ValueError, TypeError):
        return False


class CrlStore:
    """:class:`kms.core.ports.RevocationChecker` over a CRL file or folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fingerprint: Fingerprint | None = None
        self._loaded = _Loaded((), "not loaded")
        self.reload()
        if self._loaded.error is not None:
            raise CrlError(self._loaded.error)

    def reload(self) -> None:
        """Re-read the CRLs if any file changed (cheap when nothing did: a stat per file)."""
        with self._lock:
            try:
                fp = _fingerprint(self.path)
            except OSError as exc:
                self._set(None, _Loaded((), f"{self.path}: {exc.strerror or exc}"))
                return
            if fp == self._fingerprint:
                return
            crls: list[x509.CertificateRevocationList] = []
            try:
                if not fp:
                    raise CrlError(f"{self.path}: no CRL file")
                for f in _files(self.path):
                    crls.extend(parse_crls(f.read_bytes(), f.name))
            except (OSError, CrlError) as exc:
                why = str(exc) if isinstance(exc, CrlError) else f"{self.path}: {exc}"
                self._set(fp, _Loaded((), why))
                return
            self._set(
                fp,
                _Loaded(tuple(_Crl(c, frozenset(r.serial_number for r in c)) for c in crls), None),
            )

    def _set(self, fp: Fingerprint | None, loaded: _Loaded) -> None:
        if loaded.error is not None and loaded.error != self._loaded.error:
            log.error(
                "CRLs unusable, PK certificates refused", extra={"fields": {"why": loaded.error}}
            )
        elif loaded.error is None:
            log.info(
                "CRLs loaded", extra={"fields": {"path": str(self.path), "crls": len(loaded.crls)}}
            )
        self._fingerprint = fp
        self._loaded = loaded

    @property
    def crls(self) -> tuple[x509.CertificateRevocationList, ...]:
        return tuple(c.crl for c in self._loaded.crls)

    def _signed_by(self, loaded: _Loaded, index: int, issuer: x509.Certificate) -> bool:
        """Whether ``issuer``'s key verifies CRL ``index`` of ``loaded``, remembered with
        that loaded set (a reload starts afresh)."""
        key = (index, issuer.fingerprint(hashes.SHA256()))
        ok = loaded.verified.get(key)
        if ok is None:
            ok = _verifies(loaded.crls[index].crl, issuer)
            with self._lock:
                if len(loaded.verified) < MAX_VERIFIED:
                    loaded.verified[key] = ok
        return ok

    def check(
        self, cert: x509.Certificate, issuers: Sequence[x509.Certificate], now: float
    ) -> tuple[Revocation, str]:
        self.reload()
        loaded = self._loaded
        if loaded.error is not None:
            return Revocation.UNKNOWN, f"CRLs unusable: {loaded.error}"
        named = [n for n, c in enumerate(loaded.crls) if c.crl.issuer == cert.issuer]
        if not named:
            return Revocation.GOOD, "no CRL for the issuer"
        valid = [
            loaded.crls[n] for n in named if any(self._signed_by(loaded, n, i) for i in issuers)
        ]
        if not valid:
            return Revocation.UNKNOWN, "CRL for the issuer does not verify"
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        for c in valid:
            if cert.serial_number in c.serials:
                return Revocation.REVOKED, f"certificate serial {cert.serial_number:x} revoked"
        newest = max(valid, key=lambda c: c.crl.last_update_utc).crl
        if newest.next_update_utc is not None and newest.next_update_utc < when:
            return Revocation.UNKNOWN, "CRL expired (nextUpdate passed)"
        return Revocation.GOOD, "not revoked"
