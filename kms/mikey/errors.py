"""The one exception the decoder raises, whatever the bytes."""

from __future__ import annotations


class DecodeError(Exception):
    """Malformed MIKEY bytes: names the payload and the byte offset where decoding stopped.

    ``offset`` is relative to the start of the outermost buffer being decoded (the message).
    The message never contains key material: only names, offsets and numbers.
    """

    def __init__(self, payload: str, offset: int, reason: str) -> None:
        super().__init__(f"{payload} at offset {offset}: {reason}")
        self.payload = payload
        self.offset = offset
        self.reason = reason


class EncodeError(ValueError):
    """A value cannot be encoded (the caller misused the API, e.g. a field too long)."""
