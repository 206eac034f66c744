"""Ticket Request: REQUEST_INIT_PSK / REQUEST_INIT_PK -> REQUEST_RESP (RFC 6043 4.2.1, A)."""

from __future__ import annotations

from kms.core.context import Authenticated, Call, Deps, Issued
from kms.core.policy import Grant, KeyRequest, grant_policy, invalid_tp
from kms.keystore import KeyOps
from kms.mikey.base_ticket import derive_mpk_pair, derive_mpki, issue_ticket, ticket_id
from kms.mikey.chain import decode_key_data
from kms.mikey.cipher import CryptoError, compute_mac
from kms.mikey.compose import InitialMessage, RequestInit
from kms.mikey.constants import (
    DataType,
    EncrAlg,
    IdRole,
    KeyDataType,
    PayloadType,
    PrfFunc,
    TsType,
)
from kms.mikey.derive import KeyDirection
from kms.mikey.errors import DecodeError
from kms.mikey.header import Header
from kms.mikey.message import Message
from kms.mikey.ntp import encode_ts_value, timestamp_t64
from kms.mikey.payloads import Kemac, KeyData, KvSpi, Timestamp
from kms.mikey.protect import encrypt_key_data, message_keys, open_kemac, t64_of
from kms.mikey.ticket import Idr, TicketPolicy, TpFlag
from kms.mikey.views import RequestInitPk, RequestInitPsk
from kms.mikey.writer import idr_body, kemac_body, sealed_response, t_body

SPI_LENGTH = 4


def fresh_ts(like: Timestamp, now: float) -> tuple[TsType, bytes]:
    """RFC 6043: responses carry a fresh T of the request's (NTP) type: (TS type, value)."""
    ts_type = TsType(like.ts_type) if like.ts_type != TsType.COUNTER else TsType.NTP_UTC
    return ts_type, encode_ts_value(ts_type, now)


def fresh_timestamp(like: Timestamp, now: float) -> Timestamp:
    """:func:`fresh_ts` as a T payload."""
    return Timestamp(*fresh_ts(like, now))


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
    issued = issue_ticket(ks, tpk, tpk_id, policy, t_ticket, rand, mpk, session)
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

    # REQUEST_RESP = HDR, T, IDRkms, TICKET, KEMAC, V (RFC 6043 4.2.1.5), written in one
    # pass (kms.mikey.writer); V over the response || REQUEST_INIT (RFC 6043 5.4).
    ts_type, ts_value = fresh_ts(v.t, now)
    resp_keys = auth.keys_for_response(ks, msg)
    suite = auth.suite
    encr = encrypt_key_data(ks, resp_keys, suite.encr_alg, msg.header.csb_id,
                            timestamp_t64(ts_type, ts_value), out_keys)
    sealed = sealed_response(
        msg,
        DataType.REQUEST_RESP,
        (
            (PayloadType.T, t_body(ts_type, ts_value)),
            (PayloadType.IDR, idr_body(IdRole.IDRKMS, deps.policy.kms_id_type,
                                       deps.policy.kms_id)),
            (PayloadType.TICKET, issued.body),
            (PayloadType.KEMAC, kemac_body(suite.encr_alg, encr)),
        ),
        suite.mac_alg,
        lambda data: compute_mac(suite.mac_alg, resp_keys.auth_key, data),
        msg.wire,
    )
    return Issued(
        sealed,
        {
            "event": "ticket.issued",
            "ticket_id": ticket_id(issued.ticket_data),
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
