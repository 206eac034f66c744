"""An authorised intermediate node (RFC 6043 11.1: recorder, conference bridge, transcoder):
from the TRANSFER_INIT and TRANSFER_RESP it saw in the signalling it handles, it asks its
KMS for the keys of that call leg and derives the SRTP keys of both directions, the same
ones the two endpoints of the leg derive (RFC 6043 5.1.3).

The message (docs/design.md, "Keys for authorised intermediate nodes"): RESOLVE_INIT_PSK =
HDR, T, RANDRr, [IDRr], IDRkms, TICKET, IDRpsk, V (RFC 6043 4.2.3.1). IDRpsk names the node
(the PSK used); IDRr names the leg's Responder: the IDRr of the TRANSFER_RESP with forking,
else the IDRr of the TRANSFER_INIT (a Responder or a group). The RESOLVE_RESP carries the
leg's session keys only (no MPKi / MPKr'): the node cannot verify or forge TRANSFER
messages, and does not try to.

Sans-IO: each step returns the bytes to send and the state to keep.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field, replace
from typing import Protocol

from kms.endpoint.common import (
    Credentials,
    accept_kms_response,
    initial_message,
    new_csb_id,
    now_timestamp,
)
from kms.endpoint.pk import PkCredentials, pk_message
from kms.endpoint.session import EndpointError, SrtpKeys, sessions_of, srtp_keys
from kms.keystore import KeyOps
from kms.mikey.compose import compose
from kms.mikey.constants import DataType, IdRole, IdType, KeyDataType, RandRole
from kms.mikey.errors import DecodeError
from kms.mikey.message import Message
from kms.mikey.payloads import KeyData, Payload
from kms.mikey.protect import Suite, suite_for
from kms.mikey.ticket import Idr, RandR, TpFlag
from kms.mikey.views import ResolveResp, TransferInit, TransferResp

RAND_LENGTH = 32


@dataclass(frozen=True)
class PendingLeg:
    transfer_init: TransferInit
    transfer_resp: TransferResp | None
    leg: bytes | None
    resolve_init: Message
    rand_r: bytes = field(repr=False)


@dataclass(frozen=True)
class LegKeys:
    """What the node obtained: the leg's session keys and the SRTP keys of every crypto
    session of the call (both directions)."""

    leg: bytes | None
    session_keys: tuple[KeyData, ...] = field(repr=False)
    srtp: tuple[SrtpKeys, ...] = field(repr=False)
    rand_kms: bytes | None = None


def _view(data: bytes, kind: type[TransferInit] | type[TransferResp], what: str) -> object:
    try:
        view = compose(Message.decode(data))
    except DecodeError as exc:
        raise EndpointError(f"malformed {what}: {exc}") from None
    if not isinstance(view, kind):
        raise EndpointError(f"not a {what}")
    return view


class IntermediateNode:
    """``creds``: the node's identity and the PSK `kms node add` printed."""

    def __init__(self, creds: Credentials, ks: KeyOps, suite: Suite | None = None) -> None:
        self.creds = creds
        self.ks = ks
        self.suite = suite or suite_for(0)

    def resolve_init(
        self, transfer_init: bytes, transfer_resp: bytes | None, now: float
    ) -> tuple[bytes, PendingLeg]:
        """The RESOLVE_INIT_PSK asking for the keys of the leg these messages set up."""
        ti = _view(transfer_init, TransferInit, "TRANSFER_INIT")
        assert isinstance(ti, TransferInit)
        tr = None if transfer_resp is None else _view(transfer_resp, TransferResp, "TRANSFER_RESP")
        assert tr is None or isinstance(tr, TransferResp)
        if tr is not None and tr.msg.header.csb_id != ti.msg.header.csb_id:
            raise EndpointError("TRANSFER_RESP does not answer this TRANSFER_INIT")
        ticket = ti.ticket
        if ticket is None or ti.rand_i is None:
            raise EndpointError("TRANSFER_INIT without TICKET or RANDRi")
        flags = ticket.policy.flags
        if flags & TpFlag.I:
            # With forking the leg is the one the Responder's TRANSFER_RESP names (5.1.1).
            if tr is None or tr.idr_r is None or tr.rand_kms is None:
                raise EndpointError("a forking call needs the TRANSFER_RESP with IDRr, RANDRkms")
            leg: bytes | None = tr.idr_r.data
        else:
            leg = ti.idr_r.data if ti.idr_r is not None else None
        if flags & TpFlag.G and (tr is None or tr.rand_r is None):
            raise EndpointError("this ticket's keys need RANDRr from the TRANSFER_RESP")
        sessions_of(ti.msg.header.cs_map)  # usable before we bother the KMS
        c = self.creds
        rand_r = self.ks.random(RAND_LENGTH)
        payloads: list[Payload] = [now_timestamp(now), RandR(RandRole.RANDRR, rand_r)]
        if leg is not None:
            payloads.append(Idr(IdRole.IDRR, IdType.URI, leg))
        payloads += [
            Idr(IdRole.IDRKMS, c.kms_id_type, c.kms_id),
            ticket,
            Idr(IdRole.IDRPSK, c.id_type, c.psk_name or c.identity),
        ]
        resolve, _ = initial_message(
            self.ks,
            DataType.RESOLVE_INIT_PSK,
            new_csb_id(),
            self.suite.prf_func,
            payloads,
            c.psk,
            self.suite,
            None,
            rand_r,
            (leg if leg is not None else c.identity) + c.kms_id,
        )
        return resolve.wire, PendingLeg(ti, tr, leg, resolve, rand_r)

    def accept(self, pending: PendingLeg, data: bytes) -> LegKeys:
        """Verify the RESOLVE_RESP (RFC 6043 4.2.3.6) and derive the SRTP keys of the leg."""
        resp, keys = accept_kms_response(
            self.ks,
            data,
            ResolveResp,
            pending.resolve_init,
            self.creds.psk,
            self.suite,
            None,
            pending.rand_r,
        )
        assert isinstance(resp, ResolveResp)
        if any(k.key_type == KeyDataType.MPK for k in keys):
            raise EndpointError("a node's RESOLVE_RESP must not carry MPKs")
        ti, tr = pending.transfer_init, pending.transfer_resp
        assert ti.ticket is not None
        policy = ti.ticket.policy
        rand_kms = None
        if policy.flags & TpFlag.I:
            assert tr is not None and tr.rand_kms is not None
            if resp.idr_r is None or resp.idr_r.data != pending.leg or resp.rand_kms is None:
                raise EndpointError("forking RESOLVE_RESP not bound to the leg asked for")
            rand_kms = resp.rand_kms.value
            # The KMS's modifier for this leg is the one the Responder echoed (5.1.1).
            if not hmac.compare_digest(rand_kms, tr.rand_kms.value):
                raise EndpointError("RANDRkms differs from the TRANSFER_RESP's")
        rand_i = ti.rand_i.value if ti.rand_i is not None else None
        rand_r = tr.rand_r.value if tr is not None and tr.rand_r is not None else None
        hdr = ti.msg.header
        srtp = srtp_keys(
            self.ks, keys, sessions_of(hdr.cs_map), ti.sps, policy, hdr.prf_func, rand_i, rand_r
        )
        return LegKeys(pending.leg, tuple(keys), tuple(srtp), rand_kms)


class Resolver(Protocol):
    """What :func:`leg_keys` needs of a KMS transport (``kms.endpoint.client.KmsClient``)."""

    def resolve_ticket(self, data: bytes, *, correlation_id: str | None = None) -> bytes: ...


def leg_keys(
    kms: Resolver,
    node: IntermediateNode,
    transfer_init: bytes,
    transfer_resp: bytes | None,
    now: float,
) -> LegKeys:
    """Ask the KMS for the keys of the leg these messages set up; the KMS's refusal
    (``KmsRefused`` from the gRPC client: Invalid ID for a node out of scope) propagates."""
    wire, pending = node.resolve_init(transfer_init, transfer_resp, now)
    return node.accept(pending, kms.resolve_ticket(wire))


@dataclass(frozen=True)
class PkPendingLeg(PendingLeg):
    env_key: bytes = field(default=b"", repr=False)


class PkIntermediateNode(IntermediateNode):
    """A certificate node (`kms node add --cert`): RESOLVE_INIT_PK = HDR, T, RANDRr, [IDRr],
    CERT, IDRkms, TICKET, [CHASH], PKE, SIGN (RFC 6043 4.2.3.1), SIGN over the message ||
    IDRr (the leg; the node's identity without one) || IDRkms; the answer is protected with
    keys from env_key (5.1.2)."""

    def __init__(self, creds: PkCredentials, ks: KeyOps, suite: Suite | None = None) -> None:
        super().__init__(creds.psk_shaped(b""), ks, suite)
        self.pk = creds

    def _psk_side(self, env_key: bytes) -> IntermediateNode:
        return IntermediateNode(self.pk.psk_shaped(env_key), self.ks, self.suite)

    def resolve_init(
        self, transfer_init: bytes, transfer_resp: bytes | None, now: float
    ) -> tuple[bytes, PkPendingLeg]:
        env_key = self.ks.random(self.pk.env_key_bytes)
        _, draft = self._psk_side(env_key).resolve_init(transfer_init, transfer_resp, now)
        signer = replace(self.pk, identity=draft.leg if draft.leg is not None else self.pk.identity)
        msg = pk_message(signer, draft.resolve_init, env_key)
        pending = PkPendingLeg(
            draft.transfer_init, draft.transfer_resp, draft.leg, msg, draft.rand_r, env_key
        )
        return msg.wire, pending

    def accept(self, pending: PendingLeg, data: bytes) -> LegKeys:
        if not isinstance(pending, PkPendingLeg):
            raise EndpointError("not a pending RESOLVE_INIT_PK")
        return self._psk_side(pending.env_key).accept(pending, data)
