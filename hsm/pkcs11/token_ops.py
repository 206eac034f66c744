"""How the PKCS#11 key store runs AES-CM and RSA signatures on token objects, directly or by
the token-side fallbacks that hsm.pkcs11.mechanisms chose (the key never leaves the token: the
host computes only public digests and the XOR with a keystream). Used by hsm.pkcs11.store and
by ``kms token check`` (hsm.pkcs11.token_check)."""

from __future__ import annotations

import struct
from typing import Any

from pkcs11 import MGF, Mechanism

from hsm._common import scheme_digest
from hsm.pkcs11.mechanisms import MechanismPlan, Operation, Way
from kms.keystore import SignScheme

_RSA_SIGN: dict[SignScheme, tuple[Mechanism, Any]] = {
    SignScheme.RSA_PKCS1V15_SHA256: (Mechanism.SHA256_RSA_PKCS, None),
    SignScheme.RSA_PKCS1V15_SHA1: (Mechanism.SHA1_RSA_PKCS, None),
    # Salt length = hash length, as the software store uses.
    SignScheme.RSA_PSS_SHA256: (Mechanism.SHA256_RSA_PKCS_PSS, (Mechanism.SHA256, MGF.SHA256, 32)),
    SignScheme.RSA_PSS_SHA1: (Mechanism.SHA1_RSA_PKCS_PSS, (Mechanism.SHA_1, MGF.SHA1, 20)),
}


def aes_cm_by_ctr(obj: Any, iv: bytes, data: bytes) -> bytes:
    """AES-CM (RFC 3711 section 4.1.1) with the token's CKM_AES_CTR."""
    out = bytearray()
    counter = int.from_bytes(iv, "big")
    pos = 0
    while pos < len(data):
        # AES-CM counts over the full 128-bit block mod 2^128 (RFC 3711 4.1.1). With
        # ulCounterBits = 128 SoftHSM matches that, but refuses (DataLenRange) to wrap past
        # 2^128 - 1 (measured), so split there. ulCounterBits = 16 is only right while the
        # low 16 bits do not wrap; SoftHSM refuses that too.
        blocks_left = (1 << 128) - counter
        chunk = data[pos : pos + blocks_left * 16]
        param = struct.pack("=Q", 128) + counter.to_bytes(16, "big")
        out += obj.encrypt(chunk, mechanism=Mechanism.AES_CTR,
                           mechanism_param=param, buffer_size=len(chunk) + 32)
        pos += len(chunk)
        counter = 0
    return bytes(out)


def aes_cm_by_ecb(obj: Any, iv: bytes, data: bytes) -> bytes:
    """AES-CM (RFC 3711 section 4.1.1) from the token's AES-ECB: the keystream is the ECB
    encryption of IV, IV+1, ... (mod 2^128), XORed with the data here. The AES key stays a
    token object; out comes only the keystream, no more than the ciphertext reveals."""
    blocks = (len(data) + 15) // 16
    start = int.from_bytes(iv, "big")
    counters = b"".join(((start + i) & _MASK128).to_bytes(16, "big") for i in range(blocks))
    stream = bytes(obj.encrypt(counters, mechanism=Mechanism.AES_ECB,
                               buffer_size=len(counters) + 16))
    n = len(data)
    x = int.from_bytes(data, "big") ^ int.from_bytes(stream[:n], "big")
    return x.to_bytes(n, "big")


_MASK128 = (1 << 128) - 1

# RFC 8017 section 9.2, note 1: DER of DigestInfo up to the digest.
_DIGEST_INFO_PREFIX: dict[SignScheme, bytes] = {
    SignScheme.RSA_PKCS1V15_SHA1: bytes.fromhex("3021300906052b0e03021a05000414"),
    SignScheme.RSA_PKCS1V15_SHA256: bytes.fromhex("3031300d060960864801650304020105000420"),
}

def rsa_sign(obj: Any, plan: MechanismPlan, scheme: SignScheme, data: bytes) -> bytes:
    """Sign ``data`` with the private key object ``obj`` the way ``plan`` says."""
    method = plan.method(_SIGN_OPERATION[scheme])
    mech, param = _RSA_SIGN[scheme]
    if method.way is Way.DIGEST_INFO:
        # RFC 8017 section 9.2: EMSA-PKCS1-v1_5 signs DER(DigestInfo); CKM_RSA_PKCS adds the
        # type-1 padding in the token. Only the public digest is made here.
        tbs = _DIGEST_INFO_PREFIX[scheme] + scheme_digest(scheme, data)
        return bytes(obj.sign(tbs, mechanism=Mechanism.RSA_PKCS))
    if method.way is Way.PSS_OVER_DIGEST:
        # PKCS#11 v2.40 section 2.1.14: CKM_RSA_PKCS_PSS signs a digest computed outside.
        return bytes(obj.sign(scheme_digest(scheme, data), mechanism=Mechanism.RSA_PKCS_PSS,
                              mechanism_param=param))
    return bytes(obj.sign(data, mechanism=mech, mechanism_param=param))


_SIGN_OPERATION: dict[SignScheme, Operation] = {
    SignScheme.RSA_PKCS1V15_SHA256: Operation.SIGN_RSA_PKCS1V15_SHA256,
    SignScheme.RSA_PKCS1V15_SHA1: Operation.SIGN_RSA_PKCS1V15_SHA1,
    SignScheme.RSA_PSS_SHA256: Operation.SIGN_RSA_PSS_SHA256,
    SignScheme.RSA_PSS_SHA1: Operation.SIGN_RSA_PSS_SHA1,
    SignScheme.ECDSA_SHA256: Operation.SIGN_ECDSA_SHA256,
}


__all__ = ["aes_cm_by_ctr", "aes_cm_by_ecb", "rsa_sign"]
