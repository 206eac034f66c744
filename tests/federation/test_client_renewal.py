"""The federation client certificate (kms.server.federation) renewed without a restart: the
next forwarded resolve presents the new certificate (a new channel), a refused pair leaves
the current one in use, and the channel of the old certificate is retired, not cut."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from kms.core.ports import PeerKms
from kms.server.config import parse_config
from kms.server.federation import (
    RETIRED_CLOSE_S,
    FederationConfigError,
    GrpcPeerResolver,
    PeerRoute,
)
from kms.server.metrics_tls import TlsMetrics
from kms.server.tls_files import TlsWatch
from tests.federation.test_resolver import FakePeer
from tests.server.tls_pki import Ca, install, replace

PEER = PeerKms(kms_id=b"kms:a.example", psk=None, deadline_s=2.0)


def presented(data: bytes, context: Any) -> bytes:
    """The peer answers with the common name of the client certificate it was shown."""
    cn = context.auth_context().get("x509_common_name") or [b"?"]
    return bytes(cn[0])


@pytest.fixture
def peer() -> Iterator[tuple[Ca, FakePeer]]:
    ca = Ca("federation CA")
    server = ca.issue("kms-a")
    creds = grpc.ssl_server_credentials(
        [(server.key_pem, server.cert_pem)], root_certificates=ca.pem, require_client_auth=True
    )
    p = FakePeer(presented, creds)
    try:
        yield ca, p
    finally:
        p.stop()


def test_renewed_client_certificate_is_presented_on_the_next_call(
    peer: tuple[Ca, FakePeer], tmp_path: Path
) -> None:
    ca, p = peer
    cert, key = install(tmp_path, ca.issue("client-1"))
    reg = CollectorRegistry()
    metrics = TlsMetrics(reg)
    watch = TlsWatch("federation_client", cert, key, recheck_s=0)
    watch.set_events(metrics)
    t = [0.0]
    r = GrpcPeerResolver(lambda _id: PeerRoute(p.address, ca.pem), client=watch,
                         clock=lambda: t[0])
    try:
        assert r.forward_resolve(PEER, b"x", correlation_id="c", hops=1) == b"client-1"
        assert r.forward_resolve(PEER, b"x", correlation_id="c", hops=1) == b"client-1"
        assert not r._retired  # unchanged files: the same channel
        install(tmp_path, ca.issue("client-2"))
        assert r.forward_resolve(PEER, b"x", correlation_id="c", hops=1) == b"client-2"
        assert len(r._retired) == 1  # the old channel: retired, not closed under a call

        # A half-written renewal (a new certificate, the old key) is not used.
        replace(cert, ca.issue("client-3").cert_pem)
        assert r.forward_resolve(PEER, b"x", correlation_id="c", hops=1) == b"client-2"
        assert reg.get_sample_value("kms_tls_reload_rejections_total",
                                    {"listener": "federation_client",
                                     "reason": "key_mismatch"}) == 1
        assert reg.get_sample_value("kms_tls_reloads_total",
                                    {"listener": "federation_client"}) == 1
        # Retired channels are closed once no call can still be on them.
        t[0] += RETIRED_CLOSE_S + 1
        assert r.forward_resolve(PEER, b"x", correlation_id="c", hops=1) == b"client-2"
        assert not r._retired
    finally:
        r.close()


def test_unusable_client_certificate_at_start_is_a_config_error(tmp_path: Path) -> None:
    ca = Ca("CA")
    cert, key = install(tmp_path, ca.issue("a"))
    replace(key, ca.issue("b").key_pem)
    text = (
        '[kms]\nid = "sip:kms.example.org"\n[token]\nmodule = "/x.so"\nlabel = "kms"\n'
        'pin_file = "pin"\n[federation]\n'
        f'client_cert = "{cert}"\nclient_key = "{key}"\n'
    )
    config = parse_config(text, tmp_path)
    with pytest.raises(FederationConfigError, match="is not the key of the certificate"):
        GrpcPeerResolver.from_config(config, tmp_path / "registry.sqlite3")
