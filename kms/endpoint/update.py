"""CSB updating (RFC 6043 5.2): either party runs the Ticket Transfer exchange again with the
same CSB ID, a new T, no RANDs and no TICKET, to send new TGKs/TEKs or add crypto sessions.

Both messages are protected with the keys that protected the last message of the initial
exchange (reference 13.10, reading A, per the project decision 14.10). Session keys from a
new TGK use the RANDs of the initial exchange: new RANDs MUST NOT be sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from kms.endpoint.common import check_fresh, now_timestamp
from kms.endpoint.session import (
    CallState,
    CryptoSession,
    EndpointError,
    generic_id_map,
    sessions_of,
    srtp_keys,
)
from kms.keystore import KeyOps
from kms.mikey.cipher import CryptoError
from kms.mikey.compose import check_composition
from kms.mikey.constants import DataType
from kms.mikey.errors import DecodeError
from kms.mikey.header import Header
from kms.mikey.message import Message
from kms.mikey.payloads import Kemac, KeyData, Payload, SecurityPolicy
from kms.mikey.protect import check_mac, open_kemac, placeholder_v, seal_kemac, seal_mac, t64_of


@dataclass(frozen=True)
class PendingUpdate:
    state: CallState
    message: Message
    new_keys: tuple[KeyData, ...] = field(repr=False)
    sessions: tuple[CryptoSession, ...]
    policies: tuple[SecurityPolicy, ...]


def update_init(
    ks: KeyOps,
    state: CallState,
    now: float,
    new_keys: Sequence[KeyData] = (),
    sessions: Sequence[CryptoSession] | None = None,
    policies: Sequence[SecurityPolicy] | None = None,
    want_response: bool = True,
) -> tuple[bytes, PendingUpdate]:
    """An update TRANSFER_INIT: HDR (V flag = response wanted), T, {SP}, [KEMAC], V.

    IDR payloads are left out: both parties know each other from the initial exchange,
    and the MAC covers sender || receiver identities all the same.
    """
    cs = tuple(sessions) if sessions is not None else state.sessions
    sps = tuple(policies) if policies is not None else state.policies
    header = Header(
        DataType.TRANSFER_INIT, state.csb_id, generic_id_map(cs), want_response, state.prf_func
    )
    t = now_timestamp(now)
    body: list[Payload] = [t, *sps]
    if new_keys:
        draft = Message(header, (t,))
        kemac = seal_kemac(
            ks, state.keys, state.suite.encr_alg, state.csb_id, t64_of(draft), new_keys
        )
        body.append(kemac)
    body.append(placeholder_v(state.suite.mac_alg))
    sealed = seal_mac(
        Message(header, tuple(body)),
        state.keys,
        state.suite.mac_alg,
        state.local_id + state.peer_id,
    )
    return sealed.wire, PendingUpdate(state, sealed, tuple(new_keys), cs, sps)


def _decode(
    data: bytes, expected: DataType, state: CallState, now: float, window: float
) -> Message:
    try:
        msg = Message.decode(data)
        check_composition(msg)
    except DecodeError as exc:
        raise EndpointError(f"malformed CSB update: {exc}") from None
    if msg.data_type != expected or msg.header.csb_id != state.csb_id:
        raise EndpointError("not a CSB update of this call")
    check_fresh(msg, now, window)
    return msg


def _apply(
    ks: KeyOps,
    state: CallState,
    msg: Message,
    sessions: tuple[CryptoSession, ...],
    policies: tuple[SecurityPolicy, ...],
) -> CallState:
    kemac = msg.first(Kemac)
    keys = state.session_keys
    if kemac is not None:
        try:
            keys = open_kemac(ks, kemac, state.keys, state.csb_id, t64_of(msg))
        except CryptoError as exc:
            raise EndpointError("CSB update KEMAC cannot be decrypted") from exc
    srtp = srtp_keys(
        ks, keys, sessions, policies, state.policy, state.prf_func, state.rand_i, state.rand_r
    )
    return replace(state, session_keys=keys, sessions=sessions, policies=policies, srtp=tuple(srtp))


def accept_update(
    ks: KeyOps, state: CallState, data: bytes, now: float, window: float = 120.0
) -> tuple[bytes | None, CallState]:
    """Receive an update TRANSFER_INIT; return the TRANSFER_RESP (if its V flag asks for
    one) and the updated call."""
    msg = _decode(data, DataType.TRANSFER_INIT, state, now, window)
    if not check_mac(msg, state.keys, state.suite, state.peer_id + state.local_id):
        raise EndpointError("CSB update MAC verification failed")
    sps = tuple(msg.all(SecurityPolicy)) or state.policies
    new_state = _apply(ks, state, msg, tuple(sessions_of(msg.header.cs_map)), sps)
    if not msg.header.v_flag:
        return None, new_state
    h = msg.header
    header = Header(DataType.TRANSFER_RESP, h.csb_id, h.cs_map, False, h.prf_func, h.version)
    draft = Message(header, (now_timestamp(now), placeholder_v(state.suite.mac_alg)))
    resp = seal_mac(draft, state.keys, state.suite.mac_alg, msg.wire)
    return resp.wire, new_state


def apply_own_update(ks: KeyOps, pending: PendingUpdate) -> CallState:
    """The sender's new call state for an update sent without asking for a response."""
    state = replace(pending.state, session_keys=pending.new_keys or pending.state.session_keys)
    header = Header(DataType.TRANSFER_INIT, state.csb_id, prf_func=state.prf_func)
    return _apply(ks, state, Message(header, ()), pending.sessions, pending.policies)


def accept_update_resp(
    ks: KeyOps, pending: PendingUpdate, data: bytes, now: float, window: float = 120.0
) -> CallState:
    """Verify the TRANSFER_RESP to our update and switch to the new keys."""
    state = pending.state
    msg = _decode(data, DataType.TRANSFER_RESP, state, now, window)
    if not check_mac(msg, state.keys, state.suite, pending.message.wire):
        raise EndpointError("CSB update response MAC verification failed")
    return apply_own_update(ks, pending)
