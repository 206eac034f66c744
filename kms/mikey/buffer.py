"""Bounds-checked reader and writer (the aioquic pull/push style).

Every read checks the bounds of the current (sub-)buffer and raises DecodeError with the
absolute offset, so that a length field can never make the decoder read past its block.
"""

from __future__ import annotations

import struct

from kms.mikey.errors import DecodeError, EncodeError


class Reader:
    """Reads ``data[start:end]``; offsets reported are absolute in ``data``."""

    __slots__ = ("_data", "_end", "payload", "pos")

    def __init__(
        self, data: bytes, start: int = 0, end: int | None = None, payload: str = ""
    ) -> None:
        self._data = data
        self.pos = start
        self._end = len(data) if end is None else end
        self.payload = payload

    @property
    def data(self) -> bytes:
        return self._data

    @property
    def end(self) -> int:
        return self._end

    def remaining(self) -> int:
        return self._end - self.pos

    def at_end(self) -> bool:
        return self.pos >= self._end

    def error(self, reason: str, offset: int | None = None) -> DecodeError:
        return DecodeError(
            self.payload or "message", self.pos if offset is None else offset, reason
        )

    def _need(self, n: int, what: str) -> None:
        if n > self._end - self.pos:
            raise self.error(f"truncated: {what} needs {n} byte(s), {self._end - self.pos} left")

    def pull_u8(self, what: str = "field") -> int:
        self._need(1, what)
        v = self._data[self.pos]
        self.pos += 1
        return v

    def pull_u16(self, what: str = "field") -> int:
        self._need(2, what)
        (v,) = struct.unpack_from("!H", self._data, self.pos)
        self.pos += 2
        return int(v)

    def pull_u32(self, what: str = "field") -> int:
        self._need(4, what)
        (v,) = struct.unpack_from("!I", self._data, self.pos)
        self.pos += 4
        return int(v)

    def pull_bytes(self, n: int, what: str = "field") -> bytes:
        self._need(n, what)
        v = self._data[self.pos : self.pos + n]
        self.pos += n
        return v

    def sub(self, n: int, what: str) -> Reader:
        """A reader over the next ``n`` bytes (a length-prefixed block); skips them here."""
        self._need(n, what)
        r = Reader(self._data, self.pos, self.pos + n, self.payload)
        self.pos += n
        return r

    def expect_end(self, what: str) -> None:
        """A length-prefixed block must be consumed exactly (no under-run)."""
        if self.pos != self._end:
            raise self.error(f"{what}: {self._end - self.pos} unparsed byte(s) inside its length")


class Writer:
    """Builds bytes; every push checks the field's range and raises EncodeError."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def __len__(self) -> int:
        return len(self._buf)

    def getvalue(self) -> bytes:
        return bytes(self._buf)

    def push_u8(self, v: int, what: str = "field") -> None:
        if not 0 <= v <= 0xFF:
            raise EncodeError(f"{what} must fit in 8 bits, got {v}")
        self._buf.append(v)

    def push_u16(self, v: int, what: str = "field") -> None:
        if not 0 <= v <= 0xFFFF:
            raise EncodeError(f"{what} must fit in 16 bits, got {v}")
        self._buf += struct.pack("!H", v)

    def push_u32(self, v: int, what: str = "field") -> None:
        if not 0 <= v <= 0xFFFFFFFF:
            raise EncodeError(f"{what} must fit in 32 bits, got {v}")
        self._buf += struct.pack("!I", v)

    def push_bytes(self, v: bytes) -> None:
        self._buf += v

    def push_len8(self, v: bytes, what: str) -> None:
        self.push_u8(len(v), f"{what} length")
        self._buf += v

    def push_len16(self, v: bytes, what: str) -> None:
        self.push_u16(len(v), f"{what} length")
        self._buf += v
