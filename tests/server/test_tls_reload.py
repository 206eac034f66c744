"""TLS certificates renewed without a restart: a real TLS gRPC server on 127.0.0.1
(:class:`kms.server.grpc_server.KmsServer` with the dynamic credentials of
:func:`kms.server.grpc_server.tls_credentials`), files replaced the way renewal tools do,
and what new and existing connections then get; plus the watch's own rules."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from kms.core.api import KmsReply, Outcome
from kms.server.grpc_server import KmsServer, ServerError, tls_credentials, tls_watch
from kms.server.metrics_tls import TlsMetrics
from kms.server.tls_files import TlsFileError, TlsWatch, load_material
from tests.server.tls_pki import Ca, Leaf, install, peer_serial, replace


class Refuse:
    def request_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> Any:
        return KmsReply(Outcome.DENIED, detail="")

    resolve_ticket = request_ticket


def healthy(channel: grpc.Channel) -> bool:
    try:
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    except grpc.RpcError:
        return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def channel(port: int, ca: Ca, client: Leaf | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        ca.pem,
        None if client is None else client.key_pem,
        None if client is None else client.cert_pem,
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


class Served:
    """A TLS KmsServer on the files of ``folder`` (re-checked on every handshake)."""

    def __init__(self, folder: Path, leaf: Leaf, free_port: Any,
                 client_ca: bytes | None = None) -> None:
        self.folder = folder
        self.cert, self.key = install(folder, leaf)
        self.ca_file: Path | None = None
        if client_ca is not None:
            self.ca_file = folder / "client-ca.pem"
            replace(self.ca_file, client_ca)
        self.registry = CollectorRegistry()
        self.metrics = TlsMetrics(self.registry)
        self.watch = tls_watch(self.cert, self.key, self.ca_file, recheck_s=0)
        self.metrics.watching("grpc")
        self.watch.set_events(self.metrics)
        self.server = KmsServer(Refuse(), f"127.0.0.1:{free_port()}",
                                credentials=tls_credentials(self.watch))
        self.server.start()
        self.port = self.server.port

    def metric(self, name: str, **labels: str) -> float | None:
        return sample(self.registry, name, listener="grpc", **labels)


@pytest.fixture
def served(tmp_path: Path, free_port: Any) -> Iterator[tuple[Ca, Leaf, Served]]:
    ca = Ca("old CA")
    leaf = ca.issue("kms old")
    s = Served(tmp_path / "tls", leaf, free_port)
    try:
        yield ca, leaf, s
    finally:
        s.server.stop()


def test_new_connections_get_the_renewed_certificate_open_ones_keep_working(
    served: tuple[Ca, Leaf, Served],
) -> None:
    old_ca, old, s = served
    assert peer_serial(s.port) == old.cert.serial_number
    with channel(s.port, old_ca) as open_before:
        assert healthy(open_before)
        new_ca = Ca("new CA")
        new = new_ca.issue("kms new", days=30)
        install(s.folder, new)
        # A new connection gets the new certificate: by serial, and a client that trusts
        # only the new CA connects while one that trusts only the old CA no longer does.
        assert peer_serial(s.port) == new.cert.serial_number
        with channel(s.port, new_ca) as fresh:
            assert healthy(fresh)
        with channel(s.port, old_ca) as stale:
            assert not healthy(stale)
        # The connection opened before keeps its session.
        assert healthy(open_before)
    assert s.metric("kms_tls_reloads_total") == 1
    assert s.metric("kms_tls_served_certificate_not_after_timestamp_seconds") == \
        new.cert.not_valid_after_utc.timestamp()
    assert s.metric("kms_tls_reload_rejected") == 0
    assert s.watch.reloads == 1 and s.watch.rejections == 0


def test_mismatched_pair_is_refused_and_the_old_certificate_kept(
    served: tuple[Ca, Leaf, Served], caplog: pytest.LogCaptureFixture,
) -> None:
    ca, old, s = served
    new = ca.issue("kms renewed")
    other = ca.issue("someone else")
    # Half-written renewal: the new certificate is in place, the key is not (yet).
    caplog.set_level(logging.INFO, logger="kms.server.tls")
    replace(s.cert, new.cert_pem)
    replace(s.key, other.key_pem)
    for _ in range(3):  # re-checked per handshake, warned and counted once
        assert peer_serial(s.port) == old.cert.serial_number
    with channel(s.port, ca) as ch:
        assert healthy(ch)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    fields = warnings[0].fields  # type: ignore[attr-defined]
    assert fields["listener"] == "grpc" and fields["reason"] == "key_mismatch"
    assert fields["serving_serial"] == format(old.cert.serial_number, "x")
    assert "BEGIN" not in caplog.text and "PRIVATE" not in caplog.text
    assert s.metric("kms_tls_reload_rejections_total", reason="key_mismatch") == 1
    assert s.metric("kms_tls_reload_rejected") == 1
    assert s.metric("kms_tls_served_certificate_not_after_timestamp_seconds") == \
        old.cert.not_valid_after_utc.timestamp()

    # The key arrives: the next handshake takes the pair.
    replace(s.key, new.key_pem)
    assert peer_serial(s.port) == new.cert.serial_number
    assert s.metric("kms_tls_reloads_total") == 1
    assert s.metric("kms_tls_reload_rejected") == 0
    assert any("TLS certificate reloaded" in r.getMessage() for r in caplog.records)


def _expired(s: Served, ca: Ca) -> None:
    install(s.folder, ca.issue("old", expired=True))  # a matching pair, only the dates wrong


def _not_a_certificate(s: Served, ca: Ca) -> None:
    replace(s.cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n")


def _not_a_key(s: Served, ca: Ca) -> None:
    replace(s.key, b"garbage")


def _missing_key(s: Served, ca: Ca) -> None:
    s.key.unlink()


@pytest.mark.parametrize(
    ("write", "reason"),
    [(_expired, "expired"), (_not_a_certificate, "certificate_invalid"),
     (_not_a_key, "key_invalid"), (_missing_key, "unreadable")],
)
def test_unusable_files_are_refused_by_reason(
    served: tuple[Ca, Leaf, Served], write: Any, reason: str,
) -> None:
    ca, old, s = served
    write(s, ca)
    assert peer_serial(s.port) == old.cert.serial_number
    assert s.metric("kms_tls_reload_rejections_total", reason=reason) == 1
    assert s.metric("kms_tls_reload_rejected") == 1


def test_client_ca_rotation_applies_to_new_connections(
    tmp_path: Path, free_port: Any
) -> None:
    server_ca, old_clients, new_clients = Ca("server CA"), Ca("old client CA"), Ca("new client CA")
    s = Served(tmp_path / "tls", server_ca.issue("kms"), free_port, client_ca=old_clients.pem)
    try:
        old_client, new_client = old_clients.issue("alice"), new_clients.issue("bob")
        with channel(s.port, server_ca, old_client) as ch:
            assert healthy(ch)
        with channel(s.port, server_ca, new_client) as ch:
            assert not healthy(ch)
        assert s.ca_file is not None
        replace(s.ca_file, new_clients.pem)  # the old client CA is removed
        with channel(s.port, server_ca, new_client) as ch:
            assert healthy(ch)
        with channel(s.port, server_ca, old_client) as ch:
            assert not healthy(ch)
        with channel(s.port, server_ca) as ch:  # still mutual TLS: no certificate, no entry
            assert not healthy(ch)
        assert s.metric("kms_tls_reloads_total") == 1
    finally:
        s.server.stop()


def test_a_client_ca_file_without_a_certificate_is_refused(
    tmp_path: Path, free_port: Any
) -> None:
    server_ca, clients = Ca("server CA"), Ca("client CA")
    s = Served(tmp_path / "tls", server_ca.issue("kms"), free_port, client_ca=clients.pem)
    try:
        assert s.ca_file is not None
        replace(s.ca_file, b"")  # truncated by a failed copy
        alice = clients.issue("alice")
        with channel(s.port, server_ca, alice) as ch:
            assert healthy(ch)  # the previous client CA still applies
        assert s.metric("kms_tls_reload_rejections_total", reason="client_ca_invalid") == 1
    finally:
        s.server.stop()


# --- the watch on its own -------------------------------------------------------------------


def test_recheck_is_bounded_and_unchanged_files_are_not_read(tmp_path: Path) -> None:
    ca = Ca("CA")
    cert, key = install(tmp_path, ca.issue("a"))
    t = [100.0]
    watch = TlsWatch("grpc", cert, key, recheck_s=1.0, clock=lambda: t[0])
    assert watch.poll() is None  # unchanged
    b = ca.issue("b")
    install(tmp_path, b)
    t[0] += 0.5
    assert watch.poll() is None  # checked less than a second ago
    t[0] += 0.6
    new = watch.poll()
    assert new is not None and new.serial == format(b.cert.serial_number, "x")
    assert watch.current is new
    # Only a stat between changes: a key rewritten in place with the same size and
    # modification time is not read (had it been, the mismatch would be refused).
    st = key.stat()
    other = ca.issue("c").key_pem
    assert len(other) == st.st_size  # PKCS#8 P-256 keys in PEM: one length
    with key.open("r+b") as f:
        f.write(other)
    os.utime(key, ns=(st.st_atime_ns, st.st_mtime_ns))
    t[0] += 5
    assert watch.poll() is None
    assert watch.rejections == 0


def test_rejected_files_are_retried_and_warned_once(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    ca = Ca("CA")
    cert, key = install(tmp_path, ca.issue("a"))
    t = [0.0]
    watch = TlsWatch("federation_client", cert, key, recheck_s=1.0, clock=lambda: t[0])
    b = ca.issue("b")
    replace(cert, b.cert_pem)
    for _ in range(5):
        t[0] += 1
        assert watch.poll() is None
    assert watch.rejections == 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    replace(key, b.key_pem)
    t[0] += 1
    assert watch.poll() is not None


def test_startup_refuses_what_a_reload_would_refuse(tmp_path: Path) -> None:
    ca = Ca("CA")
    cert, key = install(tmp_path, ca.issue("a"))
    replace(key, ca.issue("b").key_pem)
    with pytest.raises(ServerError, match="is not the key of the certificate"):
        tls_watch(cert, key)
    with pytest.raises(ServerError, match=r"cannot read TLS certificate .*missing\.pem"):
        tls_watch(tmp_path / "missing.pem", key)
    expired = ca.issue("old", expired=True)
    install(tmp_path, expired)
    with pytest.raises(TlsFileError) as info:
        load_material(cert, key)
    assert info.value.reason == "expired"


def test_files_put_back_after_a_refusal_clear_it(tmp_path: Path) -> None:
    ca = Ca("CA")
    cert, key = install(tmp_path, ca.issue("a"))
    reg = CollectorRegistry()
    metrics = TlsMetrics(reg)
    watch = TlsWatch("grpc", cert, key, recheck_s=0, events=metrics)
    kept = tmp_path / "kept.crt"
    cert.rename(kept)  # the served file, moved aside (same inode, size, mtime)
    cert.write_bytes(ca.issue("b").cert_pem)  # a certificate without its key
    assert watch.poll() is None
    assert reg.get_sample_value("kms_tls_reload_rejected", {"listener": "grpc"}) == 1
    kept.rename(cert)  # put back
    assert watch.poll() is None
    assert reg.get_sample_value("kms_tls_reload_rejected", {"listener": "grpc"}) == 0
    assert watch.rejections == 1 and watch.reloads == 0
