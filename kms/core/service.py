"""The KMS: Ticket Request and Ticket Resolve as functions of wire bytes and time (sans-IO).

gather (decode, composition) -> check (authenticate, policy) -> issue (keys, ticket,
response), as in MIT krb5's KDC. Every decision is written to the audit sink as one record.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

from kms.core.api import KmsReply, Outcome
from kms.core.authn import (
    admit,
    authenticate_peer,
    authenticate_psk,
    check_replay,
    forwarding_peer,
)
from kms.core.context import Authenticated, Deps, Exchange
from kms.core.errors import Refusal, malformed
from kms.core.ports import StoreUnavailable
from kms.core.request import fresh_timestamp, handle_request
from kms.core.resolve import handle_resolve
from kms.core.revocation import check_identity
from kms.keystore import KeyStoreError, TokenUnavailable
from kms.mikey.buffer import Reader
from kms.mikey.compose import InitialMessage, compose
from kms.mikey.constants import DataType, ErrorNo, IdRole, PrfFunc, TsType
from kms.mikey.derive import KeyDirection
from kms.mikey.errors import DecodeError
from kms.mikey.header import EmptyMap, Header
from kms.mikey.message import Message
from kms.mikey.ntp import encode_ts_value
from kms.mikey.payloads import Error, Payload, Timestamp
from kms.mikey.protect import message_keys, placeholder_v, seal_mac
from kms.mikey.views import RequestInitPk, ResolveInitPk, ResolveInitPsk

log = logging.getLogger("kms.core")

Handler = Callable[[InitialMessage, Authenticated, Deps, Exchange, float], bytes]

_REQUEST_TYPES = {DataType.REQUEST_INIT_PSK, DataType.REQUEST_INIT_PK}
_RESOLVE_TYPES = {DataType.RESOLVE_INIT_PSK, DataType.RESOLVE_INIT_PK}
_KNOWN_PRFS = frozenset({PrfFunc.MIKEY_1, PrfFunc.PRF_HMAC_SHA_256})


def _header_only(wire: bytes) -> Message | None:
    """The HDR of an otherwise undecodable message (no payloads), if the HDR itself decodes."""
    try:
        header, _ = Header.decode(Reader(wire))
    except DecodeError:
        return None
    return Message(header)


class Kms:
    """Implements :class:`kms.core.api.KmsHandler` over the ports in ``deps``."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def close(self) -> None:
        """Close the ports that hold resources (audit sink, resolve ledger, replay cache,
        and any other port with a ``close``), each once, all of them even if one fails; the
        process that built the KMS (``kms serve``) calls it on exit."""
        seen: set[int] = set()
        first: Exception | None = None
        d = self.deps
        for port in (d.audit, d.ledger, d.replay, d.rate, d.peer_quota, d.directory):
            close = getattr(port, "close", None)
            if port is None or id(port) in seen or not callable(close):
                continue
            seen.add(id(port))
            try:
                close()
            except Exception as exc:  # close the others anyway; report the first failure
                first = first or exc
        if first is not None:
            raise first

    def request_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> KmsReply:
        return self._handle(wire, now, correlation_id, _REQUEST_TYPES, IdRole.IDRI, handle_request)

    def resolve_ticket(
        self, wire: bytes, now: float, *, correlation_id: str = "", hops: int = 0
    ) -> KmsReply:
        """``hops``: how many KMSs forwarded this request already (RFC 6043 9 federation)."""
        return self._handle(
            wire, now, correlation_id, _RESOLVE_TYPES, IdRole.IDRR, handle_resolve, hops
        )

    def refuse_undecodable(
        self, size: int, now: float, *, correlation_id: str = "", detail: str = ""
    ) -> KmsReply:
        """A call whose transport body could not be decoded at all (no MIKEY bytes to read):
        refused and audited like any other malformed input."""
        ex = Exchange(
            audit={"correlation_id": correlation_id, "time": round(now, 3), "size": size},
            correlation_id=correlation_id,
        )
        refusal = Refusal(
            ErrorNo.UNSPECIFIED,
            Outcome.MALFORMED,
            detail or "malformed request",
            "request body is not a transport message",
        )
        return self._refuse(ex, refusal, now)

    # ---------------------------------------------------------------------------------------

    def _check_prf(self, msg: Message) -> None:
        """``[policy] prf``: a PRF the KMS knows but does not accept (RFC 3830 T6.12 error 6,
        Invalid PRF). Unknown PRF values are refused as malformed when the suite is chosen."""
        prf = msg.header.prf_func
        if prf in _KNOWN_PRFS and prf not in self.deps.policy.prf_funcs:
            raise Refusal(
                ErrorNo.INVALID_PRF,
                Outcome.DENIED,
                "PRF function not allowed by this KMS",
                f"header PRF func {prf} not accepted by [policy] prf",
            )

    def _authenticate(
        self, v: InitialMessage, ex: Exchange, now: float, role: IdRole
    ) -> Authenticated:
        msg = v.msg
        if not isinstance(v, RequestInitPk | ResolveInitPk):
            peer = forwarding_peer(v, self.deps)
            if peer is not None and isinstance(v, ResolveInitPsk):
                return authenticate_peer(v, self.deps, ex, now, peer)
            return authenticate_psk(v, self.deps, ex, now, role)
        if self.deps.pk is None:
            raise Refusal(
                ErrorNo.UNSUPPORTED_MESSAGE_TYPE,
                Outcome.MALFORMED,
                "public-key messages are not enabled on this KMS",
            )
        auth = self.deps.pk.authenticate(v, now, role)
        ex.auth = auth
        ex.audit["sender"] = auth.identity.data.decode("utf-8", "replace")
        if auth.peer is not None:
            ex.audit["peer"] = auth.peer.decode("utf-8", "replace")
        if auth.method == "peer":
            # A peer KMS resolving for its Responder: the per-peer quota (checked with the
            # peer's trust) limits it, not the per-identity rate (same rule as PSK peers).
            check_replay(msg, self.deps, now)
        else:
            admit(msg, self.deps, now, auth.identity.data)
        return auth

    def _handle(
        self,
        wire: bytes,
        now: float,
        cid: str,
        types: set[DataType],
        role: IdRole,
        handler: Handler,
        hops: int = 0,
    ) -> KmsReply:
        ex = Exchange(
            audit={"correlation_id": cid, "time": round(now, 3), "size": len(wire)},
            correlation_id=cid,
            hops=hops,
        )
        if hops:
            ex.audit["hops"] = hops
        try:
            try:
                msg = Message.decode(wire)
            except DecodeError as exc:
                ex.msg = _header_only(wire)  # so that the error answers the request's CSB ID
                raise malformed(str(exc)) from None
            ex.msg = msg
            ex.audit["data_type"] = DataType(msg.data_type).name
            ex.audit["csb_id"] = f"{msg.header.csb_id:08x}"
            if msg.data_type not in types:
                raise Refusal(ErrorNo.INVALID_DT, Outcome.MALFORMED, "wrong message type")
            try:
                view = compose(msg)
            except DecodeError as exc:
                raise malformed(str(exc)) from None
            # The data type was checked against ``types``: an initial message.
            assert isinstance(view, InitialMessage)
            self._check_prf(msg)
            auth = self._authenticate(view, ex, now, role)
            ex.audit["method"] = auth.method
            check_identity(self.deps.revocations, auth.identity.data)  # suspended endpoints
            data = handler(view, auth, self.deps, ex, now)
        except Refusal as refusal:
            return self._refuse(ex, refusal, now)
        except TokenUnavailable:
            unavailable = Refusal(ErrorNo.UNSPECIFIED, Outcome.UNAVAILABLE, "token unavailable")
            return self._refuse(ex, unavailable, now, sign=False)
        except KeyStoreError as exc:
            log.error("key store error (correlation id %s): %s", cid, type(exc).__name__)
            internal = Refusal(
                ErrorNo.UNSPECIFIED, Outcome.INTERNAL, "internal error", type(exc).__name__
            )
            return self._refuse(ex, internal, now, sign=False)
        except StoreUnavailable as exc:
            # The registry or a state store cannot answer (database locked, gone): transient.
            # Fail closed: a message whose replay or ledger check could not run is not
            # accepted (RFC 3830 5.4); the client may retry with a new message.
            log.error("store unavailable (correlation id %s): %s", cid, exc.what)
            unavailable = Refusal(
                ErrorNo.UNSPECIFIED, Outcome.UNAVAILABLE, "KMS store unavailable", exc.what
            )
            return self._refuse(ex, unavailable, now, sign=False)
        except Exception as exc:
            # Whatever escaped (a lookup error, a bug): still one audit record and a MIKEY
            # error. Type only: the text of an exception may quote the request.
            frames = traceback.extract_tb(exc.__traceback__)[-3:]
            where = " <- ".join(f"{f.filename}:{f.lineno}" for f in reversed(frames))
            log.error("unexpected %s (correlation id %s) at %s", type(exc).__name__, cid, where)
            internal = Refusal(
                ErrorNo.UNSPECIFIED,
                Outcome.INTERNAL,
                "internal error",
                f"unexpected {type(exc).__name__}",
            )
            return self._refuse(ex, internal, now, sign=False)
        ex.audit["outcome"] = Outcome.OK.value
        self.deps.audit.emit(ex.audit)
        return KmsReply(Outcome.OK, data, audit=ex.audit)

    def _refuse(self, ex: Exchange, r: Refusal, now: float, *, sign: bool = True) -> KmsReply:
        ex.audit.setdefault("event", "refused")
        if ex.audit["event"] in ("ticket.issued", "ticket.resolved"):
            ex.audit["event"] = "refused"
        ex.audit.update(
            {"outcome": r.outcome.value, "error_no": int(r.error_no), "reason": r.reason}
        )
        self.deps.audit.emit(ex.audit)
        try:
            err = self._error_message(ex, r, now, sign)
        except (KeyStoreError, ValueError, DecodeError):
            err = self._error_message(ex, r, now, False)
        return KmsReply(r.outcome, b"", err, r.detail, audit=ex.audit)

    def _error_message(self, ex: Exchange, r: Refusal, now: float, sign: bool) -> bytes:
        """RFC 6043 5.4 / 6.12: HDR, T, ERR, [V]. V only once the sender was authenticated,
        keyed like the response would have been (reference 8: "same key")."""
        msg = ex.msg
        if msg is not None:
            h = msg.header
            prf = h.prf_func if h.prf_func <= 1 else 0
            header = Header(DataType.ERROR, h.csb_id, EmptyMap(0), False, prf, h.version)
            # Any decodable message may be in error here, composed or not: its T if it has one.
            sent = msg.first(Timestamp)
            if sent is not None:
                t = fresh_timestamp(sent, now)
            else:
                t = Timestamp(TsType.NTP_UTC, encode_ts_value(TsType.NTP_UTC, now))
        else:
            header = Header(DataType.ERROR, 0, EmptyMap(0))
            t = Timestamp(TsType.NTP_UTC, encode_ts_value(TsType.NTP_UTC, now))
        payloads: list[Payload] = [t, Error(r.error_no)]
        auth = ex.auth
        if not (sign and auth is not None and msg is not None):
            return Message(header, tuple(payloads)).encode()
        keys = ex.response_keys
        if keys is None:
            keys = message_keys(
                self.deps.keystore,
                auth.response_key,
                msg,
                KeyDirection.RESPONSE,
                auth.rand_i,
                auth.rand_r,
                auth.suite,
            )
        payloads.append(placeholder_v(auth.suite.mac_alg))
        return seal_mac(Message(header, tuple(payloads)), keys, auth.suite.mac_alg, b"").wire
