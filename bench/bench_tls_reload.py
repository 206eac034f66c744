#!/usr/bin/env python3
"""Cost of following renewed TLS files (kms.server.tls_files.TlsWatch) per TLS handshake.

Measures ``TlsWatch.poll`` inside the one-second re-check bound (what nearly every
handshake pays), with a stat of unchanged files (``recheck_s`` 0: the worst case without a
change), and new TLS handshakes per second to a KmsServer on 127.0.0.1 with the static
credentials of before (``grpc.ssl_server_credentials``) and with the dynamic ones (the
fetcher runs before each handshake), alternating rounds.

    .venv/bin/python bench/bench_tls_reload.py [--polls 100000] [--handshakes 400] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kms.server.grpc_server import KmsServer, tls_credentials
from kms.server.tls_files import TlsWatch


def make_pair(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    c, k = folder / "tls.crt", folder / "tls.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


def per_poll_us(watch: TlsWatch, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        watch.poll()
    return (time.perf_counter() - t0) / n * 1e6


class Nobody:
    def request_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> Any:
        raise AssertionError("no calls in this bench")

    resolve_ticket = request_ticket


def handshakes_per_s(creds: grpc.ServerCredentials, n: int) -> float:
    server = KmsServer(Nobody(), "127.0.0.1:0", credentials=creds)  # type: ignore[arg-type]
    server.start()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", server.port)) as raw, \
                    ctx.wrap_socket(raw):
                pass
        return n / (time.perf_counter() - t0)
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--polls", type=int, default=100_000)
    ap.add_argument("--handshakes", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_pair(Path(tmp))
        bounded = TlsWatch("grpc", cert, key)
        bounded.poll()  # the first check: later ones fall inside the one-second bound
        print(f"poll inside the 1 s bound: {per_poll_us(bounded, args.polls):.2f} us")
        stat = TlsWatch("grpc", cert, key, recheck_s=0)
        print(f"poll with a stat (recheck_s=0, files unchanged): "
              f"{per_poll_us(stat, args.polls // 10):.2f} us")
        static: list[float] = []
        dynamic: list[float] = []
        pem_cert, pem_key = cert.read_bytes(), key.read_bytes()
        for _ in range(args.rounds):
            static.append(handshakes_per_s(
                grpc.ssl_server_credentials([(pem_key, pem_cert)]), args.handshakes))
            dynamic.append(handshakes_per_s(
                tls_credentials(TlsWatch("grpc", cert, key)), args.handshakes))
        print(f"TLS handshakes/s, static credentials: {statistics.median(static):.0f} "
              f"(rounds {', '.join(f'{x:.0f}' for x in static)})")
        print(f"TLS handshakes/s, dynamic credentials: {statistics.median(dynamic):.0f} "
              f"(rounds {', '.join(f'{x:.0f}' for x in dynamic)})")


if __name__ == "__main__":
    main()
