"""Self-signed X.509 certificates for KMS keys whose private halves stay in the token.

``cryptography``'s CertificateBuilder can only sign with a private key object it holds, so
the TBSCertificate is built with asn1crypto and its DER is signed through
:meth:`KeyOps.sign` (the token hashes and signs; the private key is never exported).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from asn1crypto import keys as asn1_keys
from asn1crypto import pem
from asn1crypto import x509 as asn1_x509

from kms.keystore import KeyOps, KeyRef, SignScheme

DEFAULT_VALIDITY_DAYS = 3653  # ten years, leap days included
CN_MAX = 64  # X.520 ub-common-name


def _time(when: dt.datetime) -> asn1_x509.Time:
    # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050 on.
    if when.year < 2050:
        return asn1_x509.Time({"utc_time": when})
    return asn1_x509.Time({"general_time": when})


def build_self_signed_cert(
    keystore: KeyOps,
    key: KeyRef,
    kms_id: str,
    *,
    usage: str = "key_encipherment",
    validity_days: int = DEFAULT_VALIDITY_DAYS,
    now: dt.datetime | None = None,
) -> bytes:
    """DER of a self-signed certificate for the RSA key ``key`` (signed by itself).

    subjectAltName carries the KMS id as a URI (how endpoints match IDRkms to the
    certificate); the subject CN is the id too when it fits, else a fixed name. ``usage`` is
    the keyUsage bit the key is for: "key_encipherment" (PKE envelope key) or
    "digital_signature" (SIGNkms key). The certificate is not a CA (basicConstraints
    cA=FALSE): endpoints pin it, it issues nothing.
    """
    spki_der = keystore.public_key_der(key)
    spki = asn1_keys.PublicKeyInfo.load(spki_der)
    if spki.algorithm != "rsa":
        raise ValueError(f"key {key} is {spki.algorithm}, only RSA keys are supported here")
    if now is None:
        now = dt.datetime.now(dt.UTC)
    not_before = now.replace(microsecond=0)
    not_after = not_before + dt.timedelta(days=validity_days)

    cn = kms_id if len(kms_id) <= CN_MAX else "MIKEY-TICKET KMS"
    name = asn1_x509.Name.build({"common_name": cn}, use_printable=False)
    # RFC 5280 4.2.1.2 method (1): SHA-1 of the subjectPublicKey BIT STRING contents.
    key_id = hashlib.sha1(spki["public_key"].contents[1:], usedforsecurity=False).digest()
    serial = secrets.randbits(159) | (1 << 158)  # positive, <= 20 octets, fixed length

    extensions = [
        {
            "extn_id": "basic_constraints",
            "critical": True,
            "extn_value": {"ca": False},
        },
        {
            "extn_id": "key_usage",
            "critical": True,
            "extn_value": {usage},
        },
        {
            "extn_id": "subject_alt_name",
            "critical": False,
            "extn_value": [asn1_x509.GeneralName({"uniform_resource_identifier": kms_id})],
        },
        {"extn_id": "key_identifier", "critical": False, "extn_value": key_id},
        {
            "extn_id": "authority_key_identifier",
            "critical": False,
            "extn_value": {"key_identifier": key_id},
        },
    ]
    sig_alg = asn1_x509.SignedDigestAlgorithm({"algorithm": "sha256_rsa"})
    tbs = asn1_x509.TbsCertificate(
        {
            "version": "v3",
            "serial_number": serial,
            "signature": sig_alg,
            "issuer": name,
            "validity": {"not_before": _time(not_before), "not_after": _time(not_after)},
            "subject": name,
            "subject_public_key_info": spki,
            "extensions": extensions,
        }
    )
    signature = keystore.sign(key, tbs.dump(), SignScheme.RSA_PKCS1V15_SHA256)
    cert = asn1_x509.Certificate(
        {
            "tbs_certificate": tbs,
            "signature_algorithm": sig_alg,
            "signature_value": signature,
        }
    )
    return bytes(cert.dump())


def to_pem(der: bytes) -> bytes:
    return bytes(pem.armor("CERTIFICATE", der))
