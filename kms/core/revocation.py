"""Revocation that takes effect at once: suspended endpoints, revoked tickets, and tickets an
endpoint requested before a given time (sans-IO; the registry supplies the list).

RFC 6043 leaves revocation to the KMS's policy: the KMS authorises every Ticket Request and
every Ticket Resolve (4.2.1.4, 4.2.3.4), so a refusal there stops a ticket before its TRe.
The readings (docs/design.md, "Revocation"):

- A suspended endpoint is refused as Initiator (REQUEST_INIT) and as Responder
  (RESOLVE_INIT) with error number Invalid ID (RFC 3830 6.12, 7): the identity is not
  authorised now. Tickets it requested are not resolved for anyone while it is suspended:
  a stolen phone's tickets must not set up calls.
- A revoked ticket (by id, or issued to an Initiator before its revocation time) is refused
  with Invalid ticket (RFC 6043 6.12, 14), on every Responder and every peer KMS: the issuing
  KMS is the one that resolves its tickets (RFC 6043 9), so it refuses them for all.
- A ticket revocation matters only while the ticket can still be valid, so its row is pruned
  after :func:`ticket_revocation_horizon`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from kms.core.errors import denied
from kms.mikey.constants import ErrorNo, TsType
from kms.mikey.ntp import decode_ts_value
from kms.mikey.payloads import Timestamp


@dataclass(frozen=True)
class RevocationList:
    """Everything revoked now, as the registry holds it."""

    suspended: frozenset[bytes] = frozenset()
    tickets: frozenset[bytes] = frozenset()  # ticket ids (see kms.mikey.base_ticket.ticket_id)
    requested_before: Mapping[bytes, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.suspended or self.tickets or self.requested_before)


class Revocations(Protocol):
    def revocation_list(self) -> RevocationList:
        """The current list; fresh on every call, or cached until the registry changes."""
        ...


def check_identity(revocations: Revocations | None, identity: bytes) -> None:
    """Refuse a suspended endpoint, as Initiator or Responder."""
    if revocations is None:
        return
    if identity in revocations.revocation_list().suspended:
        raise denied(ErrorNo.INVALID_ID, "identity suspended", "identity suspended (revocation)")


def _issued_at(t: Timestamp) -> float | None:
    try:
        return decode_ts_value(TsType(t.ts_type), t.value)
    except ValueError:
        return None


def check_ticket(
    revocations: Revocations | None, ticket_id_hex: str, initiator: bytes | None, t: Timestamp
) -> None:
    """Refuse a revoked ticket: by id, because its Initiator is suspended, or because it was
    issued (base-ticket T) before the Initiator's requested-before time."""
    if revocations is None:
        return
    rl = revocations.revocation_list()
    if not rl:
        return
    if bytes.fromhex(ticket_id_hex) in rl.tickets:
        raise denied(ErrorNo.INVALID_TICKET, "ticket revoked", "ticket revoked (by id)")
    if initiator is None:
        return
    if initiator in rl.suspended:
        raise denied(
            ErrorNo.INVALID_TICKET, "ticket revoked", "ticket revoked (initiator suspended)"
        )
    cutoff = rl.requested_before.get(initiator)
    if cutoff is not None:
        issued = _issued_at(t)
        # A ticket whose issue time cannot be read is treated as issued before the cutoff.
        if issued is None or issued < cutoff:
            raise denied(
                ErrorNo.INVALID_TICKET,
                "ticket revoked",
                "ticket revoked (requested before the initiator's revocation time)",
            )


def ticket_revocation_horizon(max_lifetime_s: int, timestamp_window_s: int) -> int:
    """Seconds after its revocation when no ticket a ticket revocation could match is valid
    (``[policy]`` max_lifetime_s and timestamp_window_s).

    A ticket is resolved only until its TRe (:func:`kms.core.resolve.check_validity`). One
    this KMS issued at time T has TRs <= T + max_lifetime_s and TRe <= max(TRs, T) +
    max_lifetime_s (:func:`kms.core.policy.grant_policy`), so TRe <= T + 2 x max_lifetime_s;
    an Initiator-made one (mode 3) is held to the same window at resolve
    (:func:`kms.core.policy.initiator_ticket_window`), its T at most timestamp_window_s
    ahead of this KMS's clock. A revoked ticket existed when it was revoked (its id is a hash
    of its data), so T <= revocation time (+ the window for mode 3); one second more covers
    the whole-second TRs/TRe the KMS writes."""
    return 2 * max_lifetime_s + timestamp_window_s + 1
