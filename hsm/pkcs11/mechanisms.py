"""Mechanism discovery: what a PKCS#11 module offers, and how the KMS does each operation.

Every module implements a different subset of PKCS#11 (v2.40 section 5.5: C_GetMechanismList,
C_GetMechanismInfo). At connect, :func:`read_mechanisms` reads the module's mechanism list and
key-size ranges once, and :func:`plan_for` chooses, per KMS operation, the best way that keeps
the key in the token:

* a combined mechanism when the module has it (``CKM_AES_CTR``, ``CKM_SHA256_RSA_PKCS``), which
  is also the fastest path;
* otherwise a fallback built from simpler token operations: AES-CM (RFC 3711 section 4.1.1) as
  the token's ``CKM_AES_ECB`` encryption of the counter blocks, XORed with the data here (the
  per-message AES key stays a token object; only the keystream, which equals what AES-CM would
  expose anyway, comes out); PKCS#1 v1.5 signing as ``CKM_RSA_PKCS`` over a DigestInfo that is
  hashed here (RFC 8017 section 9.2; the private key stays in the token); RSA-PSS as
  ``CKM_RSA_PKCS_PSS`` over a digest hashed here (PKCS#11 v2.40 section 2.1.14).

No fallback computes with a long-term key outside the token: there is none for HMAC, RSA
decryption or key generation. An operation without a way is *missing*, and
:meth:`MechanismPlan.require` turns that into one line naming the missing mechanism, raised when
the token is opened rather than at the first call.

The planning functions are pure (a table in, a plan out) so they can be tested with the table
of any module.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pkcs11 import Mechanism
from pkcs11.exceptions import PKCS11Error

from hsm.config import TokenConfigError
from kms.keystore import UnsupportedOperation


class Operation(enum.StrEnum):
    """What the KMS asks of a token (names used in errors, ``kms token check`` and docs)."""

    HMAC_SHA1 = "hmac-sha1"
    HMAC_SHA256 = "hmac-sha256"
    AES_CM_128 = "aes-cm-128"
    AES_CM_256 = "aes-cm-256"
    RANDOM = "random"
    GENERATE_SECRET = "generate-secret"  # noqa: S105 - an operation name, not a secret
    GENERATE_RSA = "generate-rsa-2048"
    GENERATE_EC = "generate-ec-p256"
    RSA_DECRYPT_PKCS1V15 = "rsa-decrypt-pkcs1v15"
    RSA_DECRYPT_OAEP_SHA1 = "rsa-decrypt-oaep-sha1"
    SIGN_RSA_PKCS1V15_SHA256 = "sign-rsa-pkcs1v15-sha256"
    SIGN_RSA_PKCS1V15_SHA1 = "sign-rsa-pkcs1v15-sha1"
    SIGN_RSA_PSS_SHA256 = "sign-rsa-pss-sha256"
    SIGN_RSA_PSS_SHA1 = "sign-rsa-pss-sha1"
    SIGN_ECDSA_SHA256 = "sign-ecdsa-sha256"


class Way(enum.StrEnum):
    """How an operation is done (``DIRECT``: the one combined mechanism)."""

    DIRECT = "direct"
    ECB_COUNTER_BLOCKS = "AES-ECB of the counter blocks in the token, XOR on the host"
    DIGEST_INFO = "host SHA hash in a DigestInfo, raw PKCS#1 v1.5 signature in the token"
    PSS_OVER_DIGEST = "host SHA hash, raw PSS signature in the token"
    DIGEST_THEN_SIGN = "host SHA hash, raw ECDSA signature in the token"


@dataclass(frozen=True)
class MechInfo:
    """CK_MECHANISM_INFO: key sizes (units depend on the mechanism) and flags."""

    min_key: int
    max_key: int
    flags: int = 0

    def fits(self, size: int) -> bool:
        """Whether a key of ``size`` is inside the range; a maximum of 0 means "no limit"
        (openCryptoki reports 0..0 for its HMAC mechanisms)."""
        return self.min_key <= size and (self.max_key == 0 or size <= self.max_key)


MechanismTable = Mapping[int, MechInfo]
"""Mechanism number (CKM_*) -> its info, as read from one slot."""


@dataclass(frozen=True)
class Method:
    """The chosen way of doing one operation."""

    mechanism: int
    way: Way = Way.DIRECT
    function: str | None = None
    """A PKCS#11 function used instead of a mechanism (C_GenerateRandom)."""

    @property
    def mechanism_name(self) -> str:
        return self.function or mechanism_name(self.mechanism)

    @property
    def fallback(self) -> bool:
        return self.way is not Way.DIRECT

    def describe(self) -> str:
        if not self.fallback:
            return self.mechanism_name
        return f"{self.mechanism_name} ({self.way.value})"


@dataclass(frozen=True)
class MechanismPlan:
    """Per operation: the method the store uses, or why there is none."""

    methods: Mapping[Operation, Method]
    missing: Mapping[Operation, str] = field(default_factory=dict)
    """Operation -> what is missing (one phrase naming the CKM_* mechanism(s))."""

    def method(self, op: Operation) -> Method:
        m = self.methods.get(op)
        if m is None:
            raise UnsupportedOperation(
                f"{op.value} not supported by the token: {self.missing.get(op, 'no mechanism')}"
            )
        return m

    def has(self, op: Operation) -> bool:
        return op in self.methods

    def require(self, ops: Iterable[Operation | str], token: str) -> None:
        """Raise :class:`hsm.TokenConfigError` (one line) if any of ``ops`` has no way."""
        lacking = [Operation(op) for op in ops if Operation(op) not in self.methods]
        if lacking:
            what = "; ".join(f"{op.value} needs {self.missing[op]}" for op in lacking)
            raise TokenConfigError(
                f"token {token!r} cannot serve this configuration: {what}"
            )


def mechanism_name(number: int) -> str:
    try:
        return "CKM_" + Mechanism(number).name
    except ValueError:
        return f"CKM 0x{number:x}"


# Key sizes asked for, in the units PKCS#11 v2.40 gives for each mechanism: bytes for HMAC
# (section 4.1) and AES (section 2.9), bits for RSA, EC and CKM_GENERIC_SECRET_KEY_GEN.
# Modules disagree on HMAC and generic-secret units in practice, so those accept either.
_STORED_SECRET_BYTES = 32  # long-term secrets are stored padded to 32 bytes (catalogue)


SizeCheck = Callable[[MechInfo], bool]
"""Whether a mechanism's key-size range admits the key the KMS will use with it."""


def _fits_bytes_or_bits(info: MechInfo, nbytes: int) -> bool:
    return info.fits(nbytes) or info.fits(nbytes * 8)


def _choose(
    table: MechanismTable,
    candidates: list[tuple[Mechanism, Way, SizeCheck | None]],
) -> tuple[Method | None, str]:
    """First candidate present whose key-size check passes; else the reason for the first."""
    reasons: list[str] = []
    for mech, way, check in candidates:
        info = table.get(int(mech))
        if info is None:
            reasons.append(f"{mechanism_name(int(mech))} (not offered)")
            continue
        if check is not None and not check(info):
            reasons.append(
                f"{mechanism_name(int(mech))} (key sizes {info.min_key}..{info.max_key} "
                "exclude the size needed)"
            )
            continue
        return Method(int(mech), way), ""
    return None, " or ".join(reasons)


def plan_for(table: MechanismTable, *, has_rng: bool = True) -> MechanismPlan:
    """Choose a method for every :class:`Operation` from the module's mechanism table."""
    padded = _STORED_SECRET_BYTES

    def hmac_ok(info: MechInfo) -> bool:
        # Stored and session secrets are padded to 32 bytes (SoftHSM's SHA-256 minimum).
        return _fits_bytes_or_bits(info, padded)

    def aes(nbytes: int) -> SizeCheck:
        return lambda info: info.fits(nbytes) or info.fits(nbytes * 8)

    def rsa2048(info: MechInfo) -> bool:
        return info.fits(2048)

    def p256(info: MechInfo) -> bool:
        return info.fits(256)

    def secret_gen(info: MechInfo) -> bool:
        return _fits_bytes_or_bits(info, padded)

    m = Mechanism
    d = Way.DIRECT
    wanted: dict[Operation, list[tuple[Mechanism, Way, SizeCheck | None]]] = {
        Operation.HMAC_SHA1: [(m.SHA_1_HMAC, d, hmac_ok)],
        Operation.HMAC_SHA256: [(m.SHA256_HMAC, d, hmac_ok)],
        Operation.AES_CM_128: [(m.AES_CTR, d, aes(16)),
                               (m.AES_ECB, Way.ECB_COUNTER_BLOCKS, aes(16))],
        Operation.AES_CM_256: [(m.AES_CTR, d, aes(32)),
                               (m.AES_ECB, Way.ECB_COUNTER_BLOCKS, aes(32))],
        Operation.GENERATE_SECRET: [(m.GENERIC_SECRET_KEY_GEN, d, secret_gen)],
        Operation.GENERATE_RSA: [(m.RSA_PKCS_KEY_PAIR_GEN, d, rsa2048)],
        Operation.GENERATE_EC: [(m.EC_KEY_PAIR_GEN, d, p256)],
        Operation.RSA_DECRYPT_PKCS1V15: [(m.RSA_PKCS, d, rsa2048)],
        Operation.RSA_DECRYPT_OAEP_SHA1: [(m.RSA_PKCS_OAEP, d, rsa2048)],
        Operation.SIGN_RSA_PKCS1V15_SHA256: [(m.SHA256_RSA_PKCS, d, rsa2048),
                                             (m.RSA_PKCS, Way.DIGEST_INFO, rsa2048)],
        Operation.SIGN_RSA_PKCS1V15_SHA1: [(m.SHA1_RSA_PKCS, d, rsa2048),
                                           (m.RSA_PKCS, Way.DIGEST_INFO, rsa2048)],
        Operation.SIGN_RSA_PSS_SHA256: [(m.SHA256_RSA_PKCS_PSS, d, rsa2048),
                                        (m.RSA_PKCS_PSS, Way.PSS_OVER_DIGEST, rsa2048)],
        Operation.SIGN_RSA_PSS_SHA1: [(m.SHA1_RSA_PKCS_PSS, d, rsa2048),
                                      (m.RSA_PKCS_PSS, Way.PSS_OVER_DIGEST, rsa2048)],
        # Always hashed here: SoftHSM has no CKM_ECDSA_SHA256, and CKM_ECDSA is universal.
        Operation.SIGN_ECDSA_SHA256: [(m.ECDSA, Way.DIGEST_THEN_SIGN, p256)],
    }
    methods: dict[Operation, Method] = {}
    missing: dict[Operation, str] = {}
    for op, candidates in wanted.items():
        method, reason = _choose(table, candidates)
        if method is None:
            missing[op] = reason
        else:
            methods[op] = method
    if has_rng:
        # C_GenerateRandom is a function, not a mechanism; CKF_RNG in the token flags.
        methods[Operation.RANDOM] = Method(-1, Way.DIRECT, function="C_GenerateRandom")
    else:
        missing[Operation.RANDOM] = "a token random number generator (CKF_RNG)"
    return MechanismPlan(methods, missing)


def read_mechanisms(slot: Any) -> dict[int, MechInfo]:
    """The mechanism table of a python-pkcs11 slot (one C_GetMechanismList, one
    C_GetMechanismInfo per mechanism). Mechanisms python-pkcs11 cannot describe are kept
    with an empty range check skipped (0..0)."""
    table: dict[int, MechInfo] = {}
    for mech in slot.get_mechanisms():
        number = int(mech)
        try:
            info = slot.get_mechanism_info(mech)
            table[number] = MechInfo(int(info.min_key_length), int(info.max_key_length),
                                     int(info.flags) & 0xFFFFFFFF)
        except (PKCS11Error, ValueError):  # an undescribable mechanism is still offered
            table[number] = MechInfo(0, 0, 0)
    return table


__all__ = [
    "MechInfo",
    "MechanismPlan",
    "MechanismTable",
    "Method",
    "Operation",
    "Way",
    "mechanism_name",
    "plan_for",
    "read_mechanisms",
]
