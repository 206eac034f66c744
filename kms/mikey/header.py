"""Common Header payload HDR (RFC 3830 6.1, RFC 4563 5, RFC 6043 6.1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Self

from kms.mikey.buffer import Reader, Writer
from kms.mikey.constants import MIKEY_VERSION, CsIdMapType, DataType, ProtType
from kms.mikey.errors import EncodeError
from kms.mikey.payloads import as_known, known


@dataclass(frozen=True)
class SrtpIdEntry:
    """One SRTP-ID map block (RFC 3830 6.1.1): Policy_no | SSRC | ROC.

    The i-th block describes crypto session CS ID = i (1-based).
    """

    policy_no: int
    ssrc: int
    roc: int


@dataclass(frozen=True)
class SrtpIdMap:
    entries: tuple[SrtpIdEntry, ...] = ()

    MAP_TYPE = CsIdMapType.SRTP_ID


@dataclass(frozen=True)
class EmptyMap:
    """RFC 4563 5: no map info. ``cs_count`` keeps the #CS field as sent."""

    cs_count: int = 0

    MAP_TYPE = CsIdMapType.EMPTY


@dataclass(frozen=True)
class GenericIdEntry:
    """One GENERIC-ID map block (RFC 6043 6.1.1).

    CS ID | Prot type | S (1 bit) + #P (7 bits) | Policy no x #P | Session Data length (2) |
    Session Data | SPI length (1) | SPI. For SRTP, Session Data is SSRC, then ROC and SEQ
    when S = 1.
    """

    cs_id: int
    prot_type: int
    s_flag: bool
    policy_nos: tuple[int, ...]
    session_data: bytes = b""
    spi: bytes = b""


@dataclass(frozen=True)
class GenericIdMap:
    entries: tuple[GenericIdEntry, ...] = ()

    MAP_TYPE = CsIdMapType.GENERIC_ID


CsIdMap = SrtpIdMap | EmptyMap | GenericIdMap


@dataclass(frozen=True)
class Header:
    """HDR: version | data type | next payload | V + PRF func | CSB ID | #CS | map type |
    map info. The next payload field is derived from the chain when encoding."""

    data_type: int
    csb_id: int
    cs_map: CsIdMap = field(default_factory=EmptyMap)
    v_flag: bool = False
    prf_func: int = 0
    version: int = MIKEY_VERSION

    NAME = "HDR"

    @property
    def cs_count(self) -> int:
        if isinstance(self.cs_map, EmptyMap):
            return self.cs_map.cs_count
        return len(self.cs_map.entries)

    def encode(self, next_payload: int) -> bytes:
        if not 0 <= self.prf_func <= 0x7F:
            raise EncodeError("HDR PRF func must fit in 7 bits")
        w = Writer()
        w.push_u8(self.version, "version")
        w.push_u8(self.data_type, "data type")
        w.push_u8(next_payload, "next payload")
        w.push_u8((0x80 if self.v_flag else 0) | self.prf_func)
        w.push_u32(self.csb_id, "CSB ID")
        w.push_u8(self.cs_count, "#CS")
        w.push_u8(self.cs_map.MAP_TYPE)
        m = self.cs_map
        if isinstance(m, SrtpIdMap):
            for e in m.entries:
                w.push_u8(e.policy_no, "Policy_no")
                w.push_u32(e.ssrc, "SSRC")
                w.push_u32(e.roc, "ROC")
        elif isinstance(m, GenericIdMap):
            for g in m.entries:
                if len(g.policy_nos) > 0x7F:
                    raise EncodeError("GENERIC-ID: at most 127 policies per crypto session")
                w.push_u8(g.cs_id, "CS ID")
                w.push_u8(g.prot_type, "Prot type")
                w.push_u8((0x80 if g.s_flag else 0) | len(g.policy_nos))
                for p in g.policy_nos:
                    w.push_u8(p, "Policy no")
                w.push_len16(g.session_data, "Session Data")
                w.push_len8(g.spi, "SPI")
        return w.getvalue()

    @classmethod
    def decode(cls, r: Reader) -> tuple[Self, int]:
        """Decode the HDR; return it and its next payload value."""
        r.payload = cls.NAME
        at = r.pos
        version = r.pull_u8("version")
        if version != MIKEY_VERSION:
            raise r.error(f"unsupported MIKEY version {version}", at)
        at = r.pos
        data_type = known(DataType, r.pull_u8("data type"), r, "data type", at)
        next_payload = r.pull_u8("next payload")
        vp = r.pull_u8("V/PRF func")
        csb_id = r.pull_u32("CSB ID")
        n = r.pull_u8("#CS")
        at = r.pos
        map_type = known(CsIdMapType, r.pull_u8("CS ID map type"), r, "CS ID map type", at)
        cs_map: CsIdMap
        if map_type == CsIdMapType.SRTP_ID:
            entries = []
            for _ in range(n):
                entries.append(
                    SrtpIdEntry(r.pull_u8("Policy_no"), r.pull_u32("SSRC"), r.pull_u32("ROC"))
                )
            cs_map = SrtpIdMap(tuple(entries))
        elif map_type == CsIdMapType.EMPTY:
            cs_map = EmptyMap(n)
        else:
            gen = []
            for _ in range(n):
                cs_id = r.pull_u8("CS ID")
                prot = r.pull_u8("Prot type")
                sp = r.pull_u8("S/#P")
                pols = tuple(r.pull_bytes(sp & 0x7F, "Policy no"))
                sd = r.pull_bytes(r.pull_u16("Session Data length"), "Session Data")
                spi = r.pull_bytes(r.pull_u8("SPI length"), "SPI")
                gen.append(
                    GenericIdEntry(cs_id, as_known(ProtType, prot), bool(sp & 0x80), pols, sd, spi)
                )
            cs_map = GenericIdMap(tuple(gen))
        hdr = cls(data_type, csb_id, cs_map, bool(vp & 0x80), vp & 0x7F, version)
        return hdr, next_payload
