"""Ticket Request: REQUEST_INIT_PSK / REQUEST_INIT_PK -> REQUEST_RESP (RFC 6043 4.2.1, A)."""

from __future__ import annotations

from kms.core.context import Authenticated, Call, Deps, Issued
from kms.core.policy import Grant, KeyRequest, grant_policy, invalid_tp
from kms.keystore import KeyOps
from kms.mikey.base_ticket import derive_mpk_pair, derive_mpki, issue_base_ticket, ticket_id
from kms.mikey.chain import decode_key_data
from kms.mikey.cipher import CryptoError
from kms.mikey.compose import InitialMessage, RequestInit
from kms.mikey.constants import (
    DataType,
    EncrAlg,
    IdRole,
    KeyDataType,
    PrfFunc,
    TsType,
)
from kms.mikey.derive import KeyDirection
from kms.mikey.errors import DecodeError
from kms.mikey.header import Header
from kms.mikey.message import Message
from kms.mikey.ntp import encode_ts_value, timestamp_t64
from kms.mikey.payloads import Kemac, KeyData, KvSpi, Timestamp
from kms.mikey.protect import (
    message_keys,
    open_kemac,
    placeholder_v,
    seal_kemac,
    seal_mac_wire,
    t64_of,
)
from kms.mikey.ticket import Idr, TicketPolicy, TpFlag
from kms.mikey.views import RequestInitPk, RequestInitPsk

SPI_LENGTH = 4


def fresh_timestamp(like: Timestamp, now: float) -> Timestamp:
    """RFC 6043: responses carry a fresh T of the request's (NTP) type."""
    ts_type = TsType(like.ts_type) if like.ts_type != TsType.COUNTER else TsType.NTP_UTC
    return Timestamp(ts_type, encode_ts_value(ts_type, now))


def response_header(req: Message, data_type: DataType) -> Header:
    """RFC 6043 4.2.1.5 / 4.2.3.5: same version, PRF, CSB ID, #CS and map; V = 0."""
    h = req.header
    return Header(data_type, h.csb_id, h.cs_map, False, h.prf_func, h.version)


def _desired_keys(
    v: RequestInit, tp: TicketPolicy, deps: Deps, auth: Authenticated
) -> tuple[tuple[KeyData, ...], bool]:
    """Key data listed in the desired TP's KEMAC, and whether the Initiator supplied values.

    Project reading of RFC 6043 4.2.1.1 / Appendix B.2 (see docs/design.md): a desired KEMAC
    with Encr alg NULL lists requested key types and lengths (values ignored); one with an
    AES-CM Encr alg carries Initiator-chosen TEKs, encrypted with the request's message keys
    (0x01 label) so that they never cross the network in clear.
    """
    kemac = next((p for p in tp.payloads if isinstance(p, Kemac)), None)
    if kemac is None:
        return (), False
    try:
        if kemac.encr_alg == EncrAlg.NULL:
            return decode_key_data(kemac.encr_data), False
        if kemac.encr_alg != auth.suite.encr_alg:
            raise invalid_tp("desired KEMAC encryption does not match the message suite")
        keys = auth.initial_keys
        if keys is None or not keys.encr_key:
            keys = message_keys(
                deps.keystore,
                auth.response_key,
                v.msg,
                KeyDirection.INITIAL,
                auth.rand_i,
                None,
                auth.suite,
            )
        return open_kemac(deps.keystore, kemac, keys, v.hdr.csb_id, t64_of(v.t)), True
    except (DecodeError, CryptoError):
        raise invalid_tp("desired KEMAC cannot be parsed") from None


class _ExchangeRandom:
    """Random bytes for one Ticket Request, drawn from the key store in as few calls as
    possible (typically one C_GenerateRandom instead of five; the values are sent in KEMACs
    and a ticket anyway, so they pass host memory either way). Local to one exchange."""

    CHUNK = 128  # covers SPIs, TEK/TGK/salt, MPK and RAND of a typical 1-3 key request

    def __init__(self, ks: KeyOps) -> None:
        self._ks = ks
        self._buf = b""
        self._pos = 0

    def random(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            self._buf = self._ks.random(max(n, self.CHUNK))
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out


def _session_key(ks: _ExchangeRandom, req: KeyRequest) -> KeyData:
    if req.supplied is not None:
        kv = req.supplied.kv if req.supplied.kv is not None else KvSpi(ks.random(SPI_LENGTH))
        return KeyData(req.supplied.key_type, req.supplied.key, req.supplied.salt, kv)
    salt = ks.random(req.salt_length) if req.salt_length is not None else None
    # RFC 6043 6.2.1: an SPI/MKI is given for each key; keep the Initiator's if it chose one.
    kv = req.kv if isinstance(req.kv, KvSpi) and req.kv.spi else KvSpi(ks.random(SPI_LENGTH))
    return KeyData(req.key_type, ks.random(req.length), salt, kv)


def handle_request(
    v: InitialMessage, auth: Authenticated, deps: Deps, call: Call, now: float
) -> Issued:
    assert isinstance(v, RequestInitPsk | RequestInitPk)  # the service routes by data type
    ks = deps.keystore
    msg = v.msg
    tp = v.tp
    requested, supplied = _desired_keys(v, tp, deps, auth)
    grant: Grant = grant_policy(
        tp,
        initiator=Idr(IdRole.IDRI, auth.identity.id_type, auth.identity.data),
        pol=deps.policy,
        now=now,
        requested_keys=requested,
        keys_supplied=supplied,
        is_known=deps.directory.is_known,
        applications=deps.directory.applications(),
    )
    policy = grant.policy
    tp_prf = PrfFunc(policy.prf_func)
    mpk_len = 32 if tp_prf == PrfFunc.PRF_HMAC_SHA_256 else 16
    rng = _ExchangeRandom(ks)
    session = [_session_key(rng, k) for k in grant.keys]
    mpk_spi = KvSpi(rng.random(SPI_LENGTH))
    mpk = KeyData(KeyDataType.MPK, rng.random(mpk_len), None, mpk_spi)
    # RFC 6043 12.1: the base-ticket RAND is at least as long as the TPK and the MPK.
    rand = rng.random(max(32, mpk_len))
    t_ticket = Timestamp(TsType.NTP_UTC, encode_ts_value(TsType.NTP_UTC, now))
    tpk_id, tpk = deps.directory.current_tpk()
    ticket = issue_base_ticket(ks, tpk, tpk_id, policy, t_ticket, rand, mpk, session)
    # REQUEST_RESP KEMAC = E(encr_key, MPKi || [MPKr] || {TEK|TGK|GTGK}) (RFC 6043 4.2.1.5):
    # MPKr only with forking (so derived only then); Initiator-supplied keys are not sent back.
    if policy.flags & TpFlag.I:
        mpki, mpkr = derive_mpk_pair(ks, mpk.key, rand, tp_prf)
        out_keys = [KeyData(KeyDataType.MPK, mpki, None, mpk_spi),
                    KeyData(KeyDataType.MPK, mpkr, None, mpk_spi)]
    else:
        out_keys = [KeyData(KeyDataType.MPK, derive_mpki(ks, mpk.key, rand, tp_prf), None,
                            mpk_spi)]
    out_keys.extend(k for k, r in zip(session, grant.keys, strict=True) if r.supplied is None)

    t = fresh_timestamp(v.t, now)
    resp_keys = auth.keys_for_response(ks, msg)
    kemac = seal_kemac(
        ks,
        resp_keys,
        auth.suite.encr_alg,
        msg.header.csb_id,
        _t64(t),
        out_keys,
    )
    resp = Message(
        response_header(msg, DataType.REQUEST_RESP),
        (
            t,
            Idr(IdRole.IDRKMS, deps.policy.kms_id_type, deps.policy.kms_id),
            ticket,
            kemac,
            placeholder_v(auth.suite.mac_alg),
        ),
    )
    sealed = seal_mac_wire(resp, resp_keys, auth.suite.mac_alg, msg.wire)
    return Issued(
        sealed,
        {
            "event": "ticket.issued",
            "ticket_id": ticket_id(ticket.ticket_data),
            "tpk": tpk_id.decode("ascii", "replace"),
            "policy_changed": grant.changed,
            "forking": bool(policy.flags & TpFlag.I),
            "reusable": bool(policy.flags & TpFlag.J),
            "keys": [KeyDataType(k.key_type).name for k in session],
            "responders": [
                p.data.decode("utf-8", "replace")
                for p in policy.payloads
                if isinstance(p, Idr) and p.role == IdRole.IDRR
            ],
        },
    )


def _t64(t: Timestamp) -> bytes:
    return timestamp_t64(TsType(t.ts_type), t.value)
