"""CSB updating (RFC 6043 5.2): either party runs the Ticket Transfer exchange again with the
same CSB ID, a new T, no RANDs and no TICKET, to send new TGKs/TEKs or add crypto sessions.

Both messages are protected with the keys that protected the last message of the initial
exchange (RFC 6043 5.2, read literally: docs/rfc-readings.md R9). Session keys from a
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
from kms.keystore import KeyStore
from kms.mikey.cipher import CryptoError
from kms.mikey.compose import compose
from kms.mikey.constants import DataType
from kms.mikey.errors import DecodeError
from kms.mikey.header import Header
from kms.mikey.message import Message
from kms.mikey.payloads import KeyData, Payload, SecurityPolicy
from kms.mikey.protect import check_mac, open_kemac, placeholder_v, seal_kemac, seal_mac, t64_of
from kms.mikey.views import TransferInit, TransferResp


@dataclass(frozen=True)
class PendingUpdate:
    state: CallState
    message: Message
    new_keys: tuple[KeyData, ...] = field(repr=False)
    sessions: tuple[CryptoSession, ...]
    policies: tuple[SecurityPolicy, ...]


def update_init(
    ks: KeyStore,
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
        kemac = seal_kemac(
            ks, state.keys, state.suite.encr_alg, state.csb_id, t64_of(t), new_keys
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


Update = TransferInit | TransferResp


def _decode(
    data: bytes, expected: type[Update], state: CallState, now: float, window: float
) -> Update:
    try:
        msg = Message.decode(data)
        view = compose(msg)
    except DecodeError as exc:
        raise EndpointError(f"malformed CSB update: {exc}") from None
    if not isinstance(view, expected) or msg.header.csb_id != state.csb_id:
        raise EndpointError("not a CSB update of this call")
    check_fresh(view.t, now, window)
    return view


def _apply(
    ks: KeyStore,
    state: CallState,
    update: Update | None,
    sessions: tuple[CryptoSession, ...],
    policies: tuple[SecurityPolicy, ...],
) -> CallState:
    keys = state.session_keys
    if update is not None and update.kemac is not None:
        try:
            keys = open_kemac(ks, update.kemac, state.keys, state.csb_id, t64_of(update.t))
        except CryptoError as exc:
            raise EndpointError("CSB update KEMAC cannot be decrypted") from exc
    srtp = srtp_keys(
        ks, keys, sessions, policies, state.policy, state.prf_func, state.rand_i, state.rand_r
    )
    return replace(state, session_keys=keys, sessions=sessions, policies=policies, srtp=tuple(srtp))


def accept_update(
    ks: KeyStore, state: CallState, data: bytes, now: float, window: float = 120.0
) -> tuple[bytes | None, CallState]:
    """Receive an update TRANSFER_INIT; return the TRANSFER_RESP (if its V flag asks for
    one) and the updated call."""
    view = _decode(data, TransferInit, state, now, window)
    msg = view.msg
    if not check_mac(msg, state.keys, state.suite, state.peer_id + state.local_id):
        raise EndpointError("CSB update MAC verification failed")
    sps = view.sps or state.policies
    new_state = _apply(ks, state, view, tuple(sessions_of(msg.header.cs_map)), sps)
    if not msg.header.v_flag:
        return None, new_state
    h = msg.header
    header = Header(DataType.TRANSFER_RESP, h.csb_id, h.cs_map, False, h.prf_func, h.version)
    draft = Message(header, (now_timestamp(now), placeholder_v(state.suite.mac_alg)))
    resp = seal_mac(draft, state.keys, state.suite.mac_alg, msg.wire)
    return resp.wire, new_state


def apply_own_update(ks: KeyStore, pending: PendingUpdate) -> CallState:
    """The sender's new call state for an update sent without asking for a response."""
    state = replace(pending.state, session_keys=pending.new_keys or pending.state.session_keys)
    return _apply(ks, state, None, pending.sessions, pending.policies)


def accept_update_resp(
    ks: KeyStore, pending: PendingUpdate, data: bytes, now: float, window: float = 120.0
) -> CallState:
    """Verify the TRANSFER_RESP to our update and switch to the new keys."""
    state = pending.state
    msg = _decode(data, TransferResp, state, now, window).msg
    if not check_mac(msg, state.keys, state.suite, pending.message.wire):
        raise EndpointError("CSB update response MAC verification failed")
    return apply_own_update(ks, pending)
