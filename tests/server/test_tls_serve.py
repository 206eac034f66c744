"""`kms serve` with two workers, gRPC over TLS and /metrics over TLS: renewed files are
served to new connections by every worker and by the metrics listener, without a restart;
a refused renewal shows on /metrics (kms_tls_*)."""

from __future__ import annotations

import re
import ssl
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.observability.helpers import promtool
from tests.server.tls_pki import Ca, Leaf, install, peer_serial, replace

SETTLE_S = 8.0  # each worker re-checks at most once per second, on its next handshake


def set_line(text: str, pattern: str, line: str) -> str:
    text, n = re.subn(pattern, line, text, count=1, flags=re.M)
    assert n == 1, pattern
    return text


def all_new(port: int, serial: int, n: int = 12) -> bool:
    """``n`` consecutive new connections get certificate ``serial`` (the kernel spreads
    connections over the workers), polling until SETTLE_S."""
    deadline = time.monotonic() + SETTLE_S
    streak = 0
    while time.monotonic() < deadline:
        streak = streak + 1 if peer_serial(port) == serial else 0
        if streak >= n:
            return True
        time.sleep(0.1)
    return False


def scrape(port: int, ca: Ca, tmp: Path) -> str:
    (tmp / "scrape-ca.pem").write_bytes(ca.pem)
    ctx = ssl.create_default_context(cafile=str(tmp / "scrape-ca.pem"))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=ctx,
                                timeout=10) as r:
        return str(r.read().decode())


def value(text: str, sample: str) -> float | None:
    m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return None if m is None else float(m.group(1))


def test_workers_and_metrics_listener_follow_renewed_certificates(
    serve_home: Path, serve_proc: Any, free_port: Any, tmp_path: Path
) -> None:
    old_ca = Ca("old CA")
    old, old_metrics = old_ca.issue("kms"), old_ca.issue("metrics")
    grpc_dir, metrics_dir = serve_home / "tls", serve_home / "metrics-tls"
    install(grpc_dir, old)
    install(metrics_dir, old_metrics)
    toml = serve_home / "kms.toml"
    text = toml.read_text()
    text = set_line(text, r'^# tls_cert = "server.pem"$', 'tls_cert = "tls/tls.crt"')
    text = set_line(text, r'^# tls_key = "server.key"$', 'tls_key = "tls/tls.key"')
    text = set_line(text, r'^# tls_cert = "metrics.pem"$', 'tls_cert = "metrics-tls/tls.crt"')
    text = set_line(text, r'^# tls_key = "metrics.key"$', 'tls_key = "metrics-tls/tls.key"')
    toml.write_text(text)

    port, mport = free_port(), free_port()
    p = serve_proc(serve_home, "--listen", f"127.0.0.1:{port}", "--workers", "2",
                   "--metrics-listen", f"127.0.0.1:{mport}")
    try:
        p.wait_ready()
        assert peer_serial(port) == old.cert.serial_number
        assert peer_serial(mport) == old_metrics.cert.serial_number
        before = scrape(mport, old_ca, tmp_path)
        assert value(before, 'kms_tls_served_certificate_not_after_timestamp_seconds'
                             '{listener="grpc"}') == old.cert.not_valid_after_utc.timestamp()

        new_ca = Ca("new CA")
        new, new_metrics = new_ca.issue("kms", days=30), new_ca.issue("metrics", days=30)
        install(grpc_dir, new)
        install(metrics_dir, new_metrics)
        assert all_new(port, new.cert.serial_number)
        assert all_new(mport, new_metrics.cert.serial_number, n=1)
        text = scrape(mport, new_ca, tmp_path)  # only the new CA is trusted now
        assert value(text, 'kms_tls_reloads_total{listener="grpc"}') == 2  # each worker
        assert value(text, 'kms_tls_served_certificate_not_after_timestamp_seconds'
                           '{listener="grpc"}') == new.cert.not_valid_after_utc.timestamp()
        assert value(text, 'kms_tls_reload_rejected{listener="grpc"}') == 0
        # The supervisor's listener: its own values, merged into the workers' families.
        assert value(text, 'kms_tls_reloads_total{listener="metrics"}') == 1
        assert value(text, 'kms_tls_served_certificate_not_after_timestamp_seconds'
                           '{listener="metrics"}') == (
            new_metrics.cert.not_valid_after_utc.timestamp())
        checked = promtool("check", "metrics", stdin=text)  # one family per name, lint-clean
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.strip() == "" and checked.stderr.strip() == "", checked

        # A refused renewal (a certificate without its key): still the new certificate,
        # and /metrics says so.
        bad: Leaf = new_ca.issue("kms again")
        replace(grpc_dir / "tls.crt", bad.cert_pem)
        deadline = time.monotonic() + SETTLE_S
        rejected = None
        while time.monotonic() < deadline and rejected != 1:
            assert peer_serial(port) == new.cert.serial_number
            rejected = value(scrape(mport, new_ca, tmp_path),
                             'kms_tls_reload_rejected{listener="grpc"}')
            time.sleep(0.2)
        assert rejected == 1
        assert "TLS files not reloaded" in p.stderr
        assert "PRIVATE KEY" not in p.stderr
        assert p.terminate() == 0, p.stderr
    finally:
        p.kill()
