"""The KMS: Ticket Request and Ticket Resolve as functions of wire bytes and time (sans-IO).

gather (decode, composition) -> check (authenticate, policy) -> issue (keys, ticket,
response), as in MIT krb5's KDC. Every decision is written to the audit sink as one record.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace

from kms.core.api import KmsReply, Outcome
from kms.core.authn import (
    admit,
    authenticate_peer,
    authenticate_psk,
    check_replay,
    forwarding_peer,
)
from kms.core.context import Authenticated, Call, Deps, Issued, noted_audit, noted_auth, noting
from kms.core.errors import Refusal, malformed
from kms.core.federation import PeerCall, finish_forward, start_forward
from kms.core.nodes import authenticate_node, handle_node_resolve, node_request
from kms.core.ports import PeerError, StoreUnavailable
from kms.core.request import fresh_timestamp, handle_request
from kms.core.resolve import Foreign, handle_resolve
from kms.core.revocation import check_identity
from kms.core.steps import CallCancelled, Steps, drive
from kms.keystore import KeyStoreError, TokenUnavailable
from kms.mikey.buffer import Reader
from kms.mikey.compose import InitialMessage, compose
from kms.mikey.constants import DataType, ErrorNo, IdRole, PrfFunc, TsType
from kms.mikey.errors import DecodeError
from kms.mikey.header import EmptyMap, Header
from kms.mikey.message import Message
from kms.mikey.ntp import encode_ts_value
from kms.mikey.payloads import Error, Payload, Timestamp
from kms.mikey.protect import placeholder_v, seal_mac_wire
from kms.mikey.views import RequestInitPk, RequestInitPsk, ResolveInitPk, ResolveInitPsk

log = logging.getLogger("kms.core")

Handler = Callable[[InitialMessage, Authenticated, Deps, Call, float], "Issued | PeerCall"]

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


def _resolve(
    v: InitialMessage, auth: Authenticated, deps: Deps, call: Call, now: float
) -> Issued | PeerCall:
    if auth.method == "node":  # an intermediate node (RFC 6043 11.1)
        return handle_node_resolve(v, auth, deps, call, now)
    out = handle_resolve(v, auth, deps, call, now)
    if isinstance(out, Foreign):
        assert isinstance(v, ResolveInitPsk | ResolveInitPk)  # routed by data type
        return start_forward(v, auth, deps, call, now, out.issuer, out.audit)
    return out


def _refused_event(audit: dict[str, object]) -> dict[str, object]:
    """The ``event`` of a record that issued nothing: "refused", unless a step named it
    otherwise (a forwarded resolve stays "ticket.forwarded", whatever its outcome)."""
    audit.setdefault("event", "refused")
    if audit["event"] in ("ticket.issued", "ticket.resolved"):
        audit["event"] = "refused"
    return audit


@dataclass
class _Trail:
    """What the error path of one step needs: the audit record so far, the message (for
    the CSB ID and T of the error message) and the authenticated sender (for its V).
    Local to one call of :meth:`Kms._handle` or :meth:`Kms.finish_resolve`."""

    audit: dict[str, object]
    msg: Message | None = None
    auth: Authenticated | None = None


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
        """A Ticket Request in one call, any token operation made on this thread."""
        return drive(self.request_steps(wire, now, correlation_id=correlation_id))

    def request_steps(
        self, wire: bytes, now: float, *, correlation_id: str = ""
    ) -> Steps[KmsReply]:
        """:meth:`request_ticket` as steps (kms.core.steps): a REQUEST_INIT_PK yields its
        PKE's RSA decryption (RFC 3830 4.2.5) for the caller to run where it likes and send
        back; a REQUEST_INIT_PSK yields nothing."""
        reply = yield from self._handle(
            wire, now, correlation_id, _REQUEST_TYPES, IdRole.IDRI, handle_request
        )
        assert isinstance(reply, KmsReply)  # a Ticket Request never asks a peer
        return reply

    def resolve_ticket(
        self, wire: bytes, now: float, *, correlation_id: str = "", hops: int = 0
    ) -> KmsReply:
        """A resolve in one call, for a process that cannot reach peer KMSs: a ticket that
        another KMS issued is refused as if its issuer did not answer."""
        step = self.resolve_step(wire, now, correlation_id=correlation_id, hops=hops)
        if isinstance(step, PeerCall):
            return self.finish_resolve(
                step, PeerError("unavailable", "no peer transport in this process"), now
            )
        return step

    def resolve_step(
        self, wire: bytes, now: float, *, correlation_id: str = "", hops: int = 0
    ) -> KmsReply | PeerCall:
        """Handle a RESOLVE_INIT up to the point where a peer KMS must answer (RFC 6043 9):
        the reply, or a :class:`PeerCall` for the adapter to make and hand back to
        :meth:`finish_resolve`. ``hops``: how many KMSs forwarded this request already."""
        return drive(self.resolve_first_steps(wire, now, correlation_id=correlation_id,
                                              hops=hops))

    def resolve_first_steps(
        self, wire: bytes, now: float, *, correlation_id: str = "", hops: int = 0
    ) -> Steps[KmsReply | PeerCall]:
        """:meth:`resolve_step` as steps (kms.core.steps): a RESOLVE_INIT_PK yields its
        PKE's RSA decryption; a RESOLVE_INIT_PSK yields nothing."""
        return (yield from self._handle(
            wire, now, correlation_id, _RESOLVE_TYPES, IdRole.IDRR, _resolve, hops
        ))

    def finish_resolve(
        self, call: PeerCall, answer: bytes | PeerError, now: float
    ) -> KmsReply:
        """The rest of a forwarded resolve: ``answer`` is the peer's RESOLVE_RESP (to the
        message built last) or why there is none; ``now``: the time it arrived."""
        p = call.pending
        trail = _Trail(dict(call.audit), p.v.msg, p.auth)
        try:
            issued = finish_forward(call, answer, self.deps, now)
        except Exception as exc:
            return self._fail(trail, exc, now, call.correlation_id)
        return self._issued(trail, issued)

    def cancel_resolve(self, call: PeerCall) -> KmsReply:
        """A forwarded resolve whose client cancelled while the peer KMS had not answered
        (RFC 6043 9): one audit record with what the call knew, outcome CANCELLED. Whatever
        the peer answers later is discarded by the caller; nothing is issued here."""
        peer = call.peer.kms_id.decode("utf-8", "replace")
        trail = _Trail(dict(call.audit))
        return self._cancelled(trail, f"cancelled while waiting for peer KMS {peer}")

    def refuse_undecodable(
        self, size: int, now: float, *, correlation_id: str = "", detail: str = ""
    ) -> KmsReply:
        """A call whose transport body could not be decoded at all (no MIKEY bytes to read):
        refused and audited like any other malformed input."""
        trail = _Trail({"correlation_id": correlation_id, "time": round(now, 3), "size": size})
        refusal = Refusal(
            ErrorNo.UNSPECIFIED,
            Outcome.MALFORMED,
            detail or "malformed request",
            "request body is not a transport message",
        )
        return self._refuse(trail, refusal, now)

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

    def _authenticate_psk(
        self, v: RequestInitPsk | ResolveInitPsk, now: float, role: IdRole
    ) -> tuple[Authenticated, dict[str, object]]:
        """A PSK message (endpoint, peer KMS or node): no step to yield, a plain call."""
        peer = forwarding_peer(v, self.deps, now)
        if peer is not None and isinstance(v, ResolveInitPsk):
            return authenticate_peer(v, self.deps, now, peer)
        node = node_request(v, self.deps)
        if node is not None:
            return authenticate_node(node, self.deps, now)
        return authenticate_psk(v, self.deps, now, role)

    def _authenticate_pk(
        self, v: RequestInitPk | ResolveInitPk, now: float, role: IdRole
    ) -> Steps[tuple[Authenticated, dict[str, object]]]:
        """A PK message: its authentication's steps (the PKE's RSA decryption yielded),
        then admission."""
        msg = v.msg
        if self.deps.pk is None:
            raise Refusal(
                ErrorNo.UNSUPPORTED_MESSAGE_TYPE,
                Outcome.MALFORMED,
                "public-key messages are not enabled on this KMS",
            )
        auth = yield from self.deps.pk.authenticate_steps(v, now, role)
        notes: dict[str, object] = {"sender": auth.identity.data.decode("utf-8", "replace")}
        if auth.peer is not None:
            notes["peer"] = auth.peer.decode("utf-8", "replace")
        if auth.method == "node":
            # A certificate node (RFC 6043 11.1), authenticated by its pinned certificate:
            # a refusal after authentication (rate, replay) names it, as for PSK nodes.
            notes["node"] = auth.identity.data.decode("utf-8", "replace")
            if auth.node_role is not None:
                notes["role"] = auth.node_role
        with noting(notes, auth):
            if auth.method == "peer":
                # A peer KMS resolving for its Responder: the per-peer quota (checked with
                # the peer's trust) limits it, not the per-identity rate (as for PSK peers).
                check_replay(msg, self.deps, now)
            else:
                admit(msg, self.deps, now, auth.identity.data)
        return auth, notes

    def _handle(
        self,
        wire: bytes,
        now: float,
        cid: str,
        types: set[DataType],
        role: IdRole,
        handler: Handler,
        hops: int = 0,
    ) -> Steps[KmsReply | PeerCall]:
        """gather -> check -> issue for one initial message; every refusal and error
        becomes one audit record and a MIKEY error message (the core's conversion point).
        Steps: a PK message yields its PKE's RSA decryption (whatever that raises is
        re-raised here and refused as it would be inline); a PSK message yields nothing."""
        call = Call(cid, hops)
        trail = _Trail({"correlation_id": cid, "time": round(now, 3), "size": len(wire)})
        if hops:
            trail.audit["hops"] = hops
        try:
            try:
                msg = Message.decode(wire)
            except DecodeError as exc:
                trail.msg = _header_only(wire)  # so that the error answers the CSB ID
                raise malformed(str(exc)) from None
            trail.msg = msg
            trail.audit["data_type"] = DataType(msg.data_type).name
            trail.audit["csb_id"] = f"{msg.header.csb_id:08x}"
            if msg.data_type not in types:
                raise Refusal(ErrorNo.INVALID_DT, Outcome.MALFORMED, "wrong message type")
            try:
                view = compose(msg)
            except DecodeError as exc:
                raise malformed(str(exc)) from None
            # The data type was checked against ``types``: an initial message.
            assert isinstance(view, InitialMessage)
            self._check_prf(msg)
            if isinstance(view, RequestInitPk | ResolveInitPk):
                trail.auth, notes = yield from self._authenticate_pk(view, now, role)
            else:
                trail.auth, notes = self._authenticate_psk(view, now, role)
            trail.audit.update(notes)
            trail.audit["method"] = trail.auth.method
            check_identity(self.deps.revocations, trail.auth.identity.data)  # suspended
            out = handler(view, trail.auth, self.deps, call, now)
        except Exception as exc:
            return self._fail(trail, exc, now, cid)
        except CallCancelled as cancelled:
            # Thrown in where the steps yielded the PKE's RSA decryption (the one operation
            # they yield, kms.core.steps): nothing was issued, nothing was admitted.
            trail.audit.update(noted_audit(cancelled))
            return self._cancelled(trail, "cancelled while waiting for the token")
        if isinstance(out, PeerCall):
            # Audited when it finishes; the record so far travels with the call.
            return replace(out, audit={**trail.audit, **out.audit})
        return self._issued(trail, out)

    def _issued(self, trail: _Trail, issued: Issued) -> KmsReply:
        audit = {**trail.audit, **issued.audit, "outcome": Outcome.OK.value}
        self.deps.audit.emit(audit)
        return KmsReply(Outcome.OK, issued.wire, audit=audit)

    def _cancelled(self, trail: _Trail, reason: str) -> KmsReply:
        """The record of a call cancelled at a step: written like a refusal's (what was known
        so far, outcome, reason) but without ``error_no``, since no MIKEY error message is
        made: the client is gone. Steps are cancelled only while they wait, before anything
        is issued, so a call never has an "ok" and a "cancelled" record."""
        audit = _refused_event(trail.audit)
        audit.update({"outcome": Outcome.CANCELLED.value, "reason": reason})
        self.deps.audit.emit(audit)
        return KmsReply(Outcome.CANCELLED, detail="call cancelled", audit=audit)

    def _fail(self, trail: _Trail, exc: Exception, now: float, cid: str) -> KmsReply:
        """Whatever a step raised, as a refusal: with what the step had noted."""
        trail.audit.update(noted_audit(exc))
        trail.auth = trail.auth or noted_auth(exc)
        if isinstance(exc, Refusal):
            return self._refuse(trail, exc, now)
        if isinstance(exc, TokenUnavailable):
            unavailable = Refusal(ErrorNo.UNSPECIFIED, Outcome.UNAVAILABLE, "token unavailable")
            return self._refuse(trail, unavailable, now, sign=False)
        if isinstance(exc, KeyStoreError):
            log.error("key store error (correlation id %s): %s", cid, type(exc).__name__)
            internal = Refusal(
                ErrorNo.UNSPECIFIED, Outcome.INTERNAL, "internal error", type(exc).__name__
            )
            return self._refuse(trail, internal, now, sign=False)
        if isinstance(exc, StoreUnavailable):
            # The registry or a state store cannot answer (database locked, gone):
            # transient. Fail closed: a message whose replay or ledger check could not run
            # is not accepted (RFC 3830 5.4); the client may retry with a new message.
            log.error("store unavailable (correlation id %s): %s", cid, exc.what)
            unavailable = Refusal(
                ErrorNo.UNSPECIFIED, Outcome.UNAVAILABLE, "KMS store unavailable", exc.what
            )
            return self._refuse(trail, unavailable, now, sign=False)
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
        return self._refuse(trail, internal, now, sign=False)

    def _refuse(self, trail: _Trail, r: Refusal, now: float, *, sign: bool = True) -> KmsReply:
        audit = _refused_event(trail.audit)
        audit.update(
            {"outcome": r.outcome.value, "error_no": int(r.error_no), "reason": r.reason}
        )
        self.deps.audit.emit(audit)
        try:
            err = self._error_message(trail, r, now, sign)
        except (KeyStoreError, ValueError, DecodeError):
            err = self._error_message(trail, r, now, False)
        return KmsReply(r.outcome, b"", err, r.detail, audit=audit)

    def _error_message(self, trail: _Trail, r: Refusal, now: float, sign: bool) -> bytes:
        """RFC 6043 5.4 / 6.12: HDR, T, ERR, [V]. V only once the sender was authenticated,
        keyed like the response would have been (RFC 6043 5.4: the same key)."""
        msg = trail.msg
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
        auth = trail.auth
        if not (sign and auth is not None and msg is not None):
            return Message(header, tuple(payloads)).encode()
        keys = auth.keys_for_response(self.deps.keystore, msg)
        payloads.append(placeholder_v(auth.suite.mac_alg))
        return seal_mac_wire(Message(header, tuple(payloads)), keys, auth.suite.mac_alg, b"")
