"""TLS certificate files that are renewed while the KMS runs (ACME, cert-manager writing a
mounted Secret, an enterprise PKI): watched, validated, and swapped in without a restart.

A :class:`TlsWatch` holds the certificate chain, key and (optionally) client CA bundle of
one TLS listener or client, as last validated. :meth:`TlsWatch.poll` is called where a new
TLS session begins (the gRPC server's certificate fetcher runs before every handshake, the
federation client before a peer call, the ``/metrics`` listener per connection):

* at most once per ``recheck_s`` (default one second) it stats the files (device, inode,
  size, modification time: a Kubernetes Secret update swaps a symlink, an editor renames a
  new file into place, ``cp`` rewrites in place; each changes one of them). Nothing is read
  while the files are unchanged;
* when they changed it reads and validates the new set: the certificate parses (PEM, leaf
  first), is valid now (not before its notBefore, not after its notAfter: RFC 5280
  4.1.2.5), the key parses and is the key of the leaf certificate, the client CA bundle
  parses and holds at least one certificate valid now;
* a valid set is returned (and becomes the one served); an invalid one is NOT served: the
  last good set stays, one warning names the listener, the reason and the files (never key
  material or PEM), the rejection is counted, and the check is repeated on a later call
  (still at most once per ``recheck_s``), so a pair written in two steps (the certificate
  first, the key a moment later) is taken as soon as it is complete.

Every process (each SO_REUSEPORT worker, each replica) watches on its own: nothing is shared.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("kms.server.tls")

DEFAULT_RECHECK_S = 1.0

# Why a new set of files was not taken (the ``reason`` label of the rejection counter).
REASONS = (
    "unreadable",  # a file is missing or cannot be read
    "certificate_invalid",  # no PEM certificate in the certificate file
    "key_invalid",  # no usable unencrypted PEM private key in the key file
    "key_mismatch",  # the key is not the key of the (leaf) certificate
    "expired",  # now is past the certificate's notAfter
    "not_yet_valid",  # now is before the certificate's notBefore
    "client_ca_invalid",  # the client CA bundle does not parse or holds no valid CA
)

Stamp = tuple[int, int, int, int] | None  # (device, inode, size, mtime_ns); None: no file


class TlsFileError(Exception):
    """A set of TLS files that cannot be served; ``reason`` is one of :data:`REASONS`, the
    text one line naming the file (no key material)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


@dataclass(frozen=True)
class TlsMaterial:
    """One validated set: PEM bytes for grpc/ssl, and what the logs and metrics show."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes | None
    not_after: float  # the leaf certificate's notAfter, Unix time
    serial: str  # the leaf's serial number, hex (public, names the certificate in logs)


class TlsEvents(Protocol):
    """Where a watch reports (metrics); every method is called with the watch's lock held,
    so implementations must be quick and must not call back into the watch."""

    def served(self, listener: str, not_after: float) -> None: ...

    def reloaded(self, listener: str) -> None: ...

    def rejected(self, listener: str, reason: str) -> None: ...

    def pending(self, listener: str, rejected: bool) -> None: ...


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsFileError("unreadable", f"cannot read {what} {path}: {exc.strerror}") from None


def _spki(key: object) -> bytes:
    public = key.public_key()  # type: ignore[attr-defined]
    return bytes(public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ))


def load_material(
    cert: Path, key: Path, client_ca: Path | None = None, *, now: float | None = None
) -> TlsMaterial:
    """Read and validate one set of files (see the module docstring); TlsFileError if it
    must not be served."""
    at = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    cert_pem = _read(cert, "TLS certificate")
    key_pem = _read(key, "TLS key")
    ca_pem = None if client_ca is None else _read(client_ca, "client CA")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TlsFileError(
            "certificate_invalid", f"TLS certificate {cert} holds no PEM certificate"
        ) from None
    leaf = chain[0]
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):  # not PEM, not a key, or encrypted
        raise TlsFileError(
            "key_invalid", f"TLS key {key} holds no unencrypted PEM private key"
        ) from None
    if _spki(private) != _spki(leaf):
        raise TlsFileError(
            "key_mismatch", f"TLS key {key} is not the key of the certificate in {cert}"
        )
    if at > leaf.not_valid_after_utc:
        raise TlsFileError(
            "expired", f"TLS certificate {cert} expired at {leaf.not_valid_after_utc}"
        )
    if at < leaf.not_valid_before_utc:
        raise TlsFileError(
            "not_yet_valid",
            f"TLS certificate {cert} is not valid before {leaf.not_valid_before_utc}",
        )
    if client_ca is not None and ca_pem is not None:
        try:
            cas = x509.load_pem_x509_certificates(ca_pem)
        except ValueError:
            raise TlsFileError(
                "client_ca_invalid", f"client CA {client_ca} holds no PEM certificate"
            ) from None
        if not any(c.not_valid_before_utc <= at <= c.not_valid_after_utc for c in cas):
            raise TlsFileError(
                "client_ca_invalid", f"client CA {client_ca} holds no certificate valid now"
            )
    return TlsMaterial(
        cert_pem, key_pem, ca_pem, leaf.not_valid_after_utc.timestamp(),
        format(leaf.serial_number, "x"),
    )


def file_stamp(path: Path | None) -> Stamp:
    """What tells that a file changed without reading it (None: no such file). Every file
    the KMS re-reads when it changes (TLS files here, certificates for the expiry metrics)
    is compared by this stamp."""
    if path is None:
        return None
    try:
        st = os.stat(path)  # follows symlinks: a swapped Secret symlink is a new inode
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class TlsWatch:
    """The files of one TLS listener or client (``listener``: ``grpc``,
    ``federation_client``, ``metrics``), as last validated. Thread-safe.

    The constructor reads and validates the files once: TlsFileError if they cannot be
    served (a process does not start on files it would refuse to reload)."""

    def __init__(
        self,
        listener: str,
        cert: Path,
        key: Path,
        client_ca: Path | None = None,
        *,
        recheck_s: float = DEFAULT_RECHECK_S,
        events: TlsEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.listener = listener
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._recheck_s = recheck_s
        self._events = events
        self._clock = clock
        self._now = now
        self._lock = threading.Lock()
        stamp = self._stat()  # before reading: a change while reading is seen next time
        self._material = load_material(cert, key, client_ca, now=now())
        self._stamp = stamp
        self._checked: float | None = None
        self._rejected: tuple[tuple[Stamp, ...], str] | None = None
        self.reloads = 0
        self.rejections = 0
        if events is not None:
            events.served(listener, self._material.not_after)
            events.pending(listener, False)

    @property
    def current(self) -> TlsMaterial:
        return self._material

    def set_events(self, events: TlsEvents) -> None:
        """Report to ``events`` from now on (metrics are set up after the files are
        checked); the served certificate is reported at once."""
        with self._lock:
            self._events = events
            events.served(self.listener, self._material.not_after)
            events.pending(self.listener, self._rejected is not None)

    def _stat(self) -> tuple[Stamp, ...]:
        return file_stamp(self.cert), file_stamp(self.key), file_stamp(self.client_ca)

    def poll(self) -> TlsMaterial | None:
        """The new set when the files changed and the new set is valid; None when there is
        nothing new to serve (unchanged, checked less than ``recheck_s`` ago, or refused)."""
        with self._lock:
            t = self._clock()
            if self._checked is not None and t - self._checked < self._recheck_s:
                return None
            self._checked = t
            stamp = self._stat()
            if stamp == self._stamp:
                if self._rejected is not None:  # the refused files were put back as served
                    self._rejected = None
                    log.info("TLS files back to the ones served",
                             extra={"fields": {"listener": self.listener}})
                    if self._events is not None:
                        self._events.pending(self.listener, False)
                return None
            try:
                material = load_material(self.cert, self.key, self.client_ca, now=self._now())
            except TlsFileError as exc:
                self._reject(stamp, exc)
                return None
            self._material, self._stamp, self._rejected = material, stamp, None
            self.reloads += 1
            log.info(
                "TLS certificate reloaded",
                extra={"fields": {
                    "listener": self.listener, "cert": str(self.cert),
                    "serial": material.serial,
                    "not_after": dt.datetime.fromtimestamp(material.not_after, dt.UTC)
                    .isoformat(),
                }},
            )
            if self._events is not None:
                self._events.reloaded(self.listener)
                self._events.served(self.listener, material.not_after)
                self._events.pending(self.listener, False)
            return material

    def _reject(self, stamp: tuple[Stamp, ...], exc: TlsFileError) -> None:
        """One warning and one count per rejected version of the files (not per retry)."""
        if self._rejected == (stamp, exc.reason):
            return
        first = self._rejected is None
        self._rejected = (stamp, exc.reason)
        self.rejections += 1
        log.warning(
            "TLS files not reloaded: still serving the previous certificate",
            extra={"fields": {
                "listener": self.listener, "reason": exc.reason, "error": str(exc),
                "serving_serial": self._material.serial,
            }},
        )
        if self._events is not None:
            self._events.rejected(self.listener, exc.reason)
            if first:
                self._events.pending(self.listener, True)


__all__ = [
    "DEFAULT_RECHECK_S",
    "REASONS",
    "TlsEvents",
    "TlsFileError",
    "TlsMaterial",
    "TlsWatch",
    "load_material",
]
