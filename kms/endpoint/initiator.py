"""The Initiator (RFC 6043 4.2.1, 4.2.2): Ticket Request to its KMS, then Ticket Transfer to
the Responder. Sans-IO: each step returns the bytes to send and the state to keep."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from kms.endpoint.common import (
    Credentials,
    accept_kms_response,
    check_fresh,
    initial_message,
    new_csb_id,
    now_timestamp,
)
from kms.endpoint.session import (
    AES_CM_128_HMAC_SHA1_80,
    CallState,
    CryptoSession,
    EndpointError,
    SrtpKeys,
    SrtpProfile,
    generic_id_map,
    security_policy,
    srtp_keys,
)
from kms.keystore import KeyOps
from kms.mikey.chain import encode_key_data
from kms.mikey.cipher import compute_mac
from kms.mikey.compose import compose
from kms.mikey.constants import (
    DataType,
    EncrAlg,
    IdRole,
    IdType,
    KeyDataType,
    MacAlg,
    PrfFunc,
    RandRole,
    TsRole,
    TsType,
)
from kms.mikey.derive import (
    KeyDirection,
    MessageKeys,
    derive_forked_mpkr,
    derive_forked_tgk,
    derive_vr_auth_key,
)
from kms.mikey.errors import DecodeError
from kms.mikey.header import Header
from kms.mikey.message import Message
from kms.mikey.ntp import encode_ts_value, timestamp_t64
from kms.mikey.payloads import Kemac, KeyData, Payload, SecurityPolicy, Verification
from kms.mikey.protect import (
    Suite,
    check_mac,
    keyed_prf,
    message_keys,
    placeholder_v,
    seal_kemac,
    seal_mac,
    suite_for,
)
from kms.mikey.ticket import Idr, InitiatorData, RandR, Ticket, TicketPolicy, TpFlag, Tr
from kms.mikey.views import RequestResp, TransferResp

DEFAULT_FLAGS = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.N | TpFlag.O
RAND_LENGTH = 32  # RFC 6043 12.1: at least the longest key (256 bits covers every suite)


@dataclass(frozen=True)
class DesiredPolicy:
    """What the Initiator asks for in the TP of REQUEST_INIT (RFC 6043 6.10)."""

    responders: tuple[bytes, ...]
    flags: TpFlag = DEFAULT_FLAGS
    prf_func: PrfFunc = PrfFunc.MIKEY_1
    key_types: tuple[KeyDataType, ...] = ()  # () -> the KMS's default (one TGK)
    key_length: int = 0  # 0 -> the KMS's default for the PRF
    lifetime_s: int | None = None
    applications: tuple[bytes, ...] = ()
    supplied_teks: tuple[KeyData, ...] = field(default=(), repr=False)  # Appendix B.2


@dataclass(frozen=True)
class PendingRequest:
    message: Message
    rand_i: bytes
    supplied_teks: tuple[KeyData, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class TicketGrant:
    """A ticket and the keys the Initiator received with it (RFC 6043 4.2.1.6)."""

    ticket: Ticket
    mpki: bytes = field(repr=False)
    mpkr: bytes | None = field(repr=False)
    session_keys: tuple[KeyData, ...] = field(repr=False)

    @property
    def policy(self) -> TicketPolicy:
        return self.ticket.policy


@dataclass(frozen=True)
class PendingTransfer:
    grant: TicketGrant
    message: Message
    rand_i: bytes
    sessions: tuple[CryptoSession, ...]
    policies: tuple[SecurityPolicy, ...]
    keys: MessageKeys = field(repr=False)  # protected the TRANSFER_INIT
    responder: bytes = b""


class Initiator:
    def __init__(self, creds: Credentials, ks: KeyOps, suite: Suite | None = None) -> None:
        self.creds = creds
        self.ks = ks
        self.suite = suite or suite_for(PrfFunc.MIKEY_1)
        self.window_s = 120.0

    # --- Ticket Request -----------------------------------------------------------------

    def request_ticket(
        self, desired: DesiredPolicy, now: float, csb_id: int | None = None
    ) -> tuple[bytes, PendingRequest]:
        """REQUEST_INIT_PSK = HDR, T, RANDRi, IDRi, IDRkms, TP, V (RFC 6043 4.2.1.2)."""
        c = self.creds
        rand_i = self.ks.random(RAND_LENGTH)
        csb = new_csb_id() if csb_id is None else csb_id
        tp_data: list[Payload] = []
        if desired.lifetime_s is not None:
            end = int(now) + desired.lifetime_s
            tp_data.append(
                Tr(TsRole.TRE, TsType.NTP_UTC_32, encode_ts_value(TsType.NTP_UTC_32, end))
            )
        kemac = self._desired_kemac(desired, csb, now, rand_i)
        if kemac is not None:
            tp_data.append(kemac)
        tp_data += [Idr(IdRole.IDRAPP, c.id_type, a) for a in desired.applications]
        tp_data += [Idr(IdRole.IDRR, c.id_type, r) for r in desired.responders]
        flags = desired.flags | (TpFlag.L if desired.supplied_teks else TpFlag(0))
        tp = TicketPolicy(prf_func=desired.prf_func, flags=TpFlag(flags), payloads=tuple(tp_data))
        payloads: list[Payload] = [
            now_timestamp(now),
            RandR(RandRole.RANDRI, rand_i),
            Idr(IdRole.IDRI, c.id_type, c.identity),
            Idr(IdRole.IDRKMS, c.kms_id_type, c.kms_id),
            tp,
        ]
        if c.psk_name is not None:
            payloads.append(Idr(IdRole.IDRPSK, IdType.BYTE_STRING, c.psk_name))
        msg, _ = initial_message(
            self.ks,
            DataType.REQUEST_INIT_PSK,
            csb,
            self.suite.prf_func,
            payloads,
            c.psk,
            self.suite,
            rand_i,
            None,
            c.identity + c.kms_id,
        )
        return msg.wire, PendingRequest(msg, rand_i, desired.supplied_teks)

    def _desired_kemac(
        self, desired: DesiredPolicy, csb: int, now: float, rand_i: bytes
    ) -> Kemac | None:
        if desired.supplied_teks:
            # Supplied TEKs travel encrypted under this request's own message keys (0x01
            # label, its CSB ID, T and RANDRi): project reading of B.2, docs/design.md.
            draft = Message(Header(DataType.REQUEST_INIT_PSK, csb, prf_func=self.suite.prf_func))
            keys = message_keys(
                self.ks, self.creds.psk, draft, KeyDirection.INITIAL, rand_i, None, self.suite
            )
            t = now_timestamp(now)
            return seal_kemac(
                self.ks,
                keys,
                self.suite.encr_alg,
                csb,
                timestamp_t64(TsType(t.ts_type), t.value),
                desired.supplied_teks,
            )
        if not desired.key_types:
            return None
        length = desired.key_length
        wanted = [
            KeyData(
                kt,
                bytes(length),
                bytes(14)
                if kt in (KeyDataType.TGK_SALT, KeyDataType.TEK_SALT, KeyDataType.GTGK_SALT)
                else None,
            )
            for kt in desired.key_types
        ]
        return Kemac(EncrAlg.NULL, encode_key_data(wanted), MacAlg.NULL, b"")

    def accept_ticket(self, pending: PendingRequest, data: bytes, now: float) -> TicketGrant:
        """Verify REQUEST_RESP and keep the ticket and keys (RFC 6043 4.2.1.6)."""
        resp, keys = accept_kms_response(
            self.ks,
            data,
            RequestResp,
            pending.message,
            self.creds.psk,
            self.suite,
            pending.rand_i,
            None,
        )
        assert isinstance(resp, RequestResp)
        ticket = resp.ticket
        mpks = [k for k in keys if k.key_type == KeyDataType.MPK]
        forking = bool(ticket.policy.flags & TpFlag.I)
        if len(mpks) != (2 if forking else 1) or keys[: len(mpks)] != tuple(mpks):
            raise EndpointError("REQUEST_RESP KEMAC must start with MPKi [and MPKr]")
        # Keys the Initiator supplied are not sent back (RFC 6043 4.2.1.5): keep its copies.
        return TicketGrant(
            ticket,
            mpks[0].key,
            mpks[1].key if forking else None,
            tuple(keys[len(mpks) :]) + pending.supplied_teks,
        )

    # --- Ticket Transfer ----------------------------------------------------------------

    def transfer_init(
        self,
        grant: TicketGrant,
        now: float,
        responder: bytes,
        sessions: Sequence[CryptoSession],
        profile: SrtpProfile = AES_CM_128_HMAC_SHA1_80,
        csb_id: int | None = None,
    ) -> tuple[bytes, PendingTransfer]:
        """TRANSFER_INIT = HDR, T, RANDRi, IDRi, IDRr, {SP}, TICKET, V (RFC 6043 4.2.2.1),
        with Initiator Data (Vi, Vr) in the TICKET when the ticket uses forking."""
        c = self.creds
        policy = grant.policy
        suite = suite_for(policy.prf_func)
        rand_i = self.ks.random(RAND_LENGTH)
        csb = new_csb_id() if csb_id is None else csb_id
        forking = bool(policy.flags & TpFlag.I)
        sps = tuple(sorted({s.policy_no for s in sessions}))
        policies = tuple(security_policy(n, profile) for n in sps)
        header = Header(
            DataType.TRANSFER_INIT,
            csb,
            generic_id_map(sessions),
            bool(policy.flags & TpFlag.F),  # RFC 6043 4.2.2.1: V flag = TP flag F
            suite.prf_func,
        )
        ticket = grant.ticket.without_initiator_data()
        if forking:
            zero = Verification(suite.mac_alg, bytes(len(placeholder_v(suite.mac_alg).mac)))
            ticket = replace(ticket, initiator_data=InitiatorData(zero, zero))
        body: list[Payload] = [
            now_timestamp(now),
            RandR(RandRole.RANDRI, rand_i),
            Idr(IdRole.IDRI, c.id_type, c.identity),
            Idr(IdRole.IDRR, c.id_type, responder),
            *policies,
            ticket,
            placeholder_v(suite.mac_alg),
        ]
        draft = Message(header, tuple(body))
        keys = message_keys(self.ks, grant.mpki, draft, KeyDirection.INITIAL, rand_i, None, suite)
        sealed = seal_mac(draft, keys, suite.mac_alg, c.identity + responder)
        if forking:
            assert grant.mpkr is not None
            mac = sealed.payloads[-1]
            assert isinstance(mac, Verification)
            vr_key = derive_vr_auth_key(
                keyed_prf(self.ks, grant.mpkr, PrfFunc(policy.prf_func)), suite.mac_alg
            )
            init = InitiatorData(mac, Verification(suite.mac_alg, bytes(len(mac.mac))))
            vr = Verification(
                suite.mac_alg, compute_mac(suite.mac_alg, vr_key, init.vr_mac_input())
            )
            final_ticket = replace(ticket, initiator_data=InitiatorData(mac, vr))
            payloads = tuple(final_ticket if isinstance(p, Ticket) else p for p in sealed.payloads)
            sealed = Message.decode(Message(sealed.header, payloads).encode())
        pending = PendingTransfer(grant, sealed, rand_i, tuple(sessions), policies, keys, responder)
        return sealed.wire, pending

    def accept_transfer_resp(
        self, pending: PendingTransfer, data: bytes, now: float
    ) -> list[SrtpKeys]:
        """Verify TRANSFER_RESP (RFC 6043 4.2.2.4) and derive the SRTP keys."""
        return list(self.establish(pending, data, now).srtp)

    def keys_without_response(self, pending: PendingTransfer) -> list[SrtpKeys]:
        """With F = 0 no TRANSFER_RESP comes: keys from RANDRi alone (H = 1, G = 0)."""
        return list(self.establish(pending, None, 0.0).srtp)

    def establish(self, pending: PendingTransfer, data: bytes | None, now: float) -> CallState:
        """The call after TRANSFER_RESP (or without one when F = 0): SRTP keys and what a CSB
        update needs. With forking, MPKr' and TGK' come from its IDRr and RANDRkms (5.1.1)."""
        if data is None:
            return self._without_response(pending)
        grant = pending.grant
        policy = grant.policy
        suite = suite_for(policy.prf_func)
        try:
            msg = Message.decode(data)
            view = compose(msg)
        except DecodeError as exc:
            raise EndpointError(f"malformed TRANSFER_RESP: {exc}") from None
        if not isinstance(view, TransferResp) or msg.header.csb_id != pending.message.header.csb_id:
            raise EndpointError("message does not answer this TRANSFER_INIT")
        check_fresh(view.t, now, self.window_s)
        rand_r = view.rand_r.value if view.rand_r is not None else None
        if policy.flags & TpFlag.G and rand_r is None:
            raise EndpointError("TRANSFER_RESP lacks RANDRr although the ticket asks for it")
        session_keys = grant.session_keys
        mac_key = grant.mpki
        if policy.flags & TpFlag.I:
            idr_r = view.idr_r
            if idr_r is None or view.rand_kms is None or grant.mpkr is None:
                raise EndpointError("forking TRANSFER_RESP lacks IDRr or RANDRkms")
            rand_kms = view.rand_kms.value
            prf = PrfFunc(policy.prf_func)
            mac_key = derive_forked_mpkr(
                keyed_prf(self.ks, grant.mpkr, prf), idr_r.data, rand_kms, len(grant.mpkr)
            )
            session_keys = tuple(
                replace(
                    k,
                    key=derive_forked_tgk(
                        keyed_prf(self.ks, k.key, prf), idr_r.data, rand_kms, len(k.key)
                    ),
                )
                if k.key_type in (KeyDataType.TGK, KeyDataType.TGK_SALT)
                else k
                for k in session_keys
            )
        keys = message_keys(
            self.ks,
            mac_key,
            pending.message,
            KeyDirection.RESPONSE,
            pending.rand_i,
            rand_r if policy.flags & TpFlag.G else None,
            suite,
        )
        if not check_mac(msg, keys, suite, pending.message.wire):
            raise EndpointError("TRANSFER_RESP MAC verification failed")
        return self._state(pending, keys, session_keys, rand_r)

    def _without_response(self, pending: PendingTransfer) -> CallState:
        if pending.grant.policy.flags & (TpFlag.F | TpFlag.G | TpFlag.I):
            raise EndpointError("this ticket needs the TRANSFER_RESP")
        return self._state(pending, pending.keys, pending.grant.session_keys, None)

    def _state(
        self,
        pending: PendingTransfer,
        keys: MessageKeys,
        session_keys: tuple[KeyData, ...],
        rand_r: bytes | None,
    ) -> CallState:
        policy = pending.grant.policy
        hdr = pending.message.header
        srtp = srtp_keys(
            self.ks,
            session_keys,
            pending.sessions,
            pending.policies,
            policy,
            hdr.prf_func,
            pending.rand_i,
            rand_r,
        )
        return CallState(
            hdr.csb_id,
            hdr.prf_func,
            suite_for(policy.prf_func),
            keys,
            self.creds.identity,
            pending.responder,
            pending.rand_i,
            rand_r,
            policy,
            session_keys,
            pending.sessions,
            pending.policies,
            tuple(srtp),
        )
