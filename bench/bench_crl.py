#!/usr/bin/env python3
"""Cost of CRL revocation checking (``[pk] crl``, kms.server.crl.CrlStore) per PK message.

Makes a CA and a CRL with --entries revoked serials (cryptography), then measures loading
the file and ``check`` for a certificate that is not revoked (the common case: a stat of the
file, a set lookup, the signature check remembered after the first call).

    .venv/bin/python bench/bench_crl.py [--entries 10000] [--checks 5000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kms.server.crl import CrlStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=10_000, help="revoked serials in the CRL")
    ap.add_argument("--checks", type=int, default=5_000, help="checks to time")
    args = ap.parse_args()

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=9))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(leaf_key.public_key()).serial_number(args.entries + 7)
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=9))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
    )
    for serial in range(1, args.entries + 1):
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(key, hashes.SHA256())

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ca.crl.pem"
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        t0 = time.perf_counter()
        store = CrlStore(path)
        load_ms = (time.perf_counter() - t0) * 1000
        at = now.timestamp()
        status, _ = store.check(leaf, [ca], at)
        t0 = time.perf_counter()
        for _ in range(args.checks):
            store.check(leaf, [ca], at)
        per_check = (time.perf_counter() - t0) / args.checks * 1e6
    print(f"CRL entries: {args.entries}  load: {load_ms:.1f} ms  status: {status.value}")
    print(f"check (not revoked, file unchanged): {per_check:.1f} us  ({args.checks} checks)")


if __name__ == "__main__":
    main()
