"""The key-forking modifier RANDRkms (RFC 6043 5.1.1), computed in the token.

RFC 6043 5.1.1 asks for a "(pseudo-)random" modifier, at least as long as the longest forked
key (12.1), and 5.3 says a reused ticket keeps its modifier. It is computed here as a keyed
pseudo-random function of (ticket id, IDRr) under a dedicated long-term token secret that
never leaves the token (``kms init`` creates it; the serving path creates it in a home made
before it existed):

    T_i      = HMAC-SHA-256(K_mod, LABEL || i || ticket id || len16(IDRr) || IDRr)
    RANDRkms = first n bytes of T_1 || T_2 || ...

so one HMAC in the token (n <= 32) replaces the C_GenerateRandom of a fresh modifier. A
Responder that resolves the same ticket again gets the same RANDRkms, every replica sharing
the token computes the same value without shared state, and the KMS can give an authorised
intermediate node (RFC 6043 11.1) the forked keys of the leg it names by IDRr alone.
Different Responders of one ticket get unrelated modifiers, as with fresh randomness.
"""

from __future__ import annotations

from collections.abc import Callable

from kms.keystore import Digest, KeyOps, KeyRef

LABEL = b"MIKEY-TICKET RANDRkms"
BLOCK = 32  # HMAC-SHA-256 output


def modifier_input(ticket_id: bytes, responder: bytes, block: int) -> bytes:
    if not 1 <= block <= 255:
        raise ValueError("modifier block out of range")
    return LABEL + bytes([block]) + ticket_id + len(responder).to_bytes(2, "big") + responder


def rand_kms(ks: KeyOps, key: KeyRef, ticket_id: bytes, responder: bytes, length: int) -> bytes:
    """RANDRkms for ``responder`` (its IDRr ID Data) of the ticket ``ticket_id`` (16 bytes,
    the audit log's ticket id)."""
    if length <= 0 or len(responder) > 0xFFFF:
        raise ValueError("bad modifier length or responder identity")
    out = b""
    block = 1
    while len(out) < length:
        out += ks.hmac(key, modifier_input(ticket_id, responder, block), Digest.SHA256)
        block += 1
    return out[:length]


def modifier_for(
    ks: KeyOps, key: KeyRef | None, ticket_id: bytes, responder: bytes
) -> Callable[[int], bytes] | None:
    """What :func:`kms.mikey.resolution.resolve_ticket_keys` draws RANDRkms from (None:
    no modifier key, a fresh random one)."""
    if key is None:
        return None
    return lambda n: rand_kms(ks, key, ticket_id, responder, n)
