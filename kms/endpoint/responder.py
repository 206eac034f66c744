"""The Responder (RFC 6043 4.2.2, 4.2.3): receives TRANSFER_INIT, resolves the ticket at its
KMS, verifies TRANSFER_INIT with the MPKi it learnt, and answers with TRANSFER_RESP.
Sans-IO: each step returns the bytes to send and the state to keep."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from kms.endpoint.common import (
    Credentials,
    accept_kms_response,
    check_fresh,
    initial_message,
    new_csb_id,
    now_timestamp,
)
from kms.endpoint.session import CallState, EndpointError, SrtpKeys, sessions_of, srtp_keys
from kms.keystore import KeyOps
from kms.mikey.compose import compose
from kms.mikey.constants import (
    BASE_TICKET_SUBTYPE,
    BASE_TICKET_VERSION,
    DataType,
    IdRole,
    IdType,
    KeyDataType,
    RandRole,
    TicketType,
)
from kms.mikey.derive import KeyDirection, MessageKeys
from kms.mikey.errors import DecodeError
from kms.mikey.header import Header
from kms.mikey.message import Message
from kms.mikey.payloads import KeyData, Payload
from kms.mikey.protect import (
    Suite,
    check_mac,
    message_keys,
    placeholder_v,
    seal_mac,
    suite_for,
)
from kms.mikey.ticket import Idr, RandR, TpFlag
from kms.mikey.views import ResolveResp, TransferInit

RAND_LENGTH = 32


@dataclass(frozen=True)
class PendingResolve:
    transfer_init: TransferInit
    resolve_init: Message
    rand_r: bytes = field(repr=False)


@dataclass(frozen=True)
class ResolvedCall:
    """The outcome of a Ticket Transfer for the Responder."""

    transfer_resp: bytes | None  # None when the ticket says no TRANSFER_RESP (F = 0)
    srtp: list[SrtpKeys] = field(repr=False)
    initiator: bytes
    session_keys: tuple[KeyData, ...] = field(repr=False)
    state: CallState | None = field(default=None, repr=False)


class Responder:
    def __init__(self, creds: Credentials, ks: KeyOps, suite: Suite | None = None) -> None:
        self.creds = creds
        self.ks = ks
        self.suite = suite or suite_for(0)
        self.window_s = 120.0

    def receive_transfer_init(self, data: bytes, now: float) -> tuple[bytes, PendingResolve]:
        """Early checks (RFC 6043 4.2.2.2), then RESOLVE_INIT_PSK = HDR, T, RANDRr, IDRr,
        IDRkms, TICKET, V to send to our KMS (4.2.3.2). The TICKET is forwarded unchanged."""
        try:
            msg = Message.decode(data)
            view = compose(msg)
        except DecodeError as exc:
            raise EndpointError(f"malformed TRANSFER_INIT: {exc}") from None
        if not isinstance(view, TransferInit):
            raise EndpointError("not a TRANSFER_INIT")
        check_fresh(view.t, now, self.window_s)
        ticket = view.ticket
        if ticket is None or view.rand_i is None:
            raise EndpointError("TRANSFER_INIT without TICKET or RANDRi")
        p = ticket.policy
        if (p.ticket_type, p.subtype, p.version) != (
            TicketType.MIKEY_BASE_TICKET,
            BASE_TICKET_SUBTYPE,
            BASE_TICKET_VERSION,
        ) and not p.flags & TpFlag.O:
            raise EndpointError("ticket type not supported")
        sessions_of(msg.header.cs_map)  # the SP / map must be usable before we bother the KMS
        c = self.creds
        rand_r = self.ks.random(RAND_LENGTH)
        payloads: list[Payload] = [
            now_timestamp(now),
            RandR(RandRole.RANDRR, rand_r),
            Idr(IdRole.IDRR, c.id_type, c.identity),
            Idr(IdRole.IDRKMS, c.kms_id_type, c.kms_id),
            ticket,
        ]
        if c.psk_name is not None:
            payloads.append(Idr(IdRole.IDRPSK, IdType.BYTE_STRING, c.psk_name))
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
            c.identity + c.kms_id,
        )
        return resolve.wire, PendingResolve(view, resolve, rand_r)

    def accept_resolve(self, pending: PendingResolve, data: bytes, now: float) -> ResolvedCall:
        """Verify RESOLVE_RESP (4.2.3.6), then TRANSFER_INIT with MPKi (and Vi when forking),
        derive SRTP keys and build TRANSFER_RESP (4.2.2.3)."""
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
        ticket = pending.transfer_init.ticket
        assert ticket is not None  # receive_transfer_init refused a TRANSFER_INIT without
        forking = bool(ticket.policy.flags & TpFlag.I)
        mpks = [k for k in keys if k.key_type == KeyDataType.MPK]
        if len(mpks) != (2 if forking else 1) or keys[: len(mpks)] != tuple(mpks):
            raise EndpointError("RESOLVE_RESP KEMAC must start with MPKi [and MPKr']")
        modifier = None
        if forking:
            assert isinstance(resp, ResolveResp)
            if resp.idr_r is None or resp.rand_kms is None:
                raise EndpointError("forking RESOLVE_RESP lacks IDRr or RANDRkms")
            modifier = (resp.idr_r, resp.rand_kms.value)
        return self.finish(
            pending.transfer_init,
            mpks[0].key,
            mpks[1].key if forking else None,
            tuple(keys[len(mpks) :]),
            modifier,
            now,
        )

    def finish(
        self,
        view: TransferInit,
        mpki: bytes,
        forked_mpkr: bytes | None,
        session_keys: tuple[KeyData, ...],
        modifier: tuple[Idr, bytes] | None,
        now: float,
    ) -> ResolvedCall:
        """With the ticket's keys in hand (from the KMS or resolved locally): verify
        TRANSFER_INIT, derive SRTP keys and build TRANSFER_RESP (RFC 6043 4.2.2.3)."""
        ti, ticket = view.msg, view.ticket
        if ticket is None:
            raise EndpointError("TRANSFER_INIT without TICKET")
        policy = ticket.policy
        forking = bool(policy.flags & TpFlag.I)
        suite = suite_for(policy.prf_func)

        # TRANSFER_INIT can be verified only now that MPKi is known (RFC 6043 4.2.2).
        rand_i = view.rand_i.value if view.rand_i is not None else None
        idr_i, idr_r = view.idr_i, view.idr_r
        id_i = idr_i.data if idr_i is not None else b""
        id_r = idr_r.data if idr_r is not None else self.creds.identity
        ti_keys = message_keys(self.ks, mpki, ti, KeyDirection.INITIAL, rand_i, None, suite)
        if not check_mac(ti, ti_keys, suite, id_i + id_r):
            raise EndpointError("TRANSFER_INIT MAC verification failed")
        if forking:
            init = ticket.initiator_data
            if init is None or not hmac.compare_digest(init.vi.mac, view.v.mac):
                raise EndpointError("Vi does not match the TRANSFER_INIT MAC")

        sessions = sessions_of(ti.header.cs_map)
        sps = view.sps
        rand_r = self.ks.random(RAND_LENGTH) if policy.flags & TpFlag.G else None
        srtp = srtp_keys(
            self.ks, session_keys, sessions, sps, policy, ti.header.prf_func, rand_i, rand_r
        )

        def state(keys: MessageKeys) -> CallState:
            return CallState(
                ti.header.csb_id,
                ti.header.prf_func,
                suite,
                keys,
                # The identities the initial TRANSFER_INIT MAC covered (IDRr as sent there, maybe
                # a group): CSB updates cover the same pair (RFC 6043 5.4).
                id_r,
                id_i,
                rand_i,
                rand_r,
                policy,
                session_keys,
                tuple(sessions),
                sps,
                tuple(srtp),
            )

        if not policy.flags & TpFlag.F:
            return ResolvedCall(None, srtp, id_i, session_keys, state(ti_keys))

        # TRANSFER_RESP = HDR, T, [RANDRr], [IDRr], [RANDRkms], V (RFC 6043 4.2.2.3): with
        # forking, the IDRr and RANDRkms the KMS returned, and a MAC from MPKr'.
        body: list[Payload] = [now_timestamp(now)]
        if rand_r is not None:
            body.append(RandR(RandRole.RANDRR, rand_r))
        mac_key = mpki
        if forking:
            if modifier is None or forked_mpkr is None:
                raise EndpointError("a forking ticket needs IDRr, RANDRkms and MPKr'")
            body += [modifier[0], RandR(RandRole.RANDRKMS, modifier[1])]
            mac_key = forked_mpkr
        body.append(placeholder_v(suite.mac_alg))
        h = ti.header
        header = Header(DataType.TRANSFER_RESP, h.csb_id, h.cs_map, False, h.prf_func, h.version)
        draft = Message(header, tuple(body))
        resp_keys = message_keys(self.ks, mac_key, ti, KeyDirection.RESPONSE, rand_i, rand_r, suite)
        sealed = seal_mac(draft, resp_keys, suite.mac_alg, ti.wire)
        return ResolvedCall(sealed.wire, srtp, id_i, session_keys, state(resp_keys))
