"""Audit sinks: one JSON object per line, to a file or a logger. Never key material: the
core puts only identities, ticket ids, decisions and reasons in records.

What one call can write is bounded: every string field is cut to ``MAX_FIELD_CHARS`` (with
the length and a digest of what was cut, so that records stay comparable), and a record
that is still longer than ``MAX_RECORD_BYTES`` keeps only its fixed fields. The file sink
rotates by size (``max_bytes``, ``keep`` old files), safely across worker processes, and
reopens its file when someone else renamed it (logrotate without ``copytruncate``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path

MAX_FIELD_CHARS = 256
MAX_RECORD_BYTES = 2048
# Fields kept when a record is too long even after cutting (all short by construction).
ESSENTIAL = ("correlation_id", "time", "size", "event", "outcome", "error_no", "data_type")
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_KEEP = 5


def bounded_text(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text`` if short; else its start, its length and a digest of the whole."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    tail = f"...({len(text)} chars, sha256:{digest})"
    return text[: max(0, limit - len(tail))] + tail


def bounded_record(record: Mapping[str, object]) -> str:
    """The record as one JSON line of at most MAX_RECORD_BYTES (UTF-8)."""
    cut: dict[str, object] = {}
    for k, v in record.items():  # one record per exchange: no call for what is short
        key = k if isinstance(k, str) and len(k) <= 64 else bounded_text(str(k), 64)
        cut[key] = bounded_text(v) if isinstance(v, str) and len(v) > MAX_FIELD_CHARS else v
    line = json.dumps(cut, sort_keys=True, default=str, separators=(",", ":"))
    if len(line.encode("utf-8")) <= MAX_RECORD_BYTES:
        return line
    small = {k: cut[k] for k in ESSENTIAL if k in cut}
    small["truncated"] = True
    small["reason"] = "audit record over size limit"
    return json.dumps(small, sort_keys=True, default=str, separators=(",", ":"))[
        :MAX_RECORD_BYTES
    ]


class JsonLinesAuditSink:
    """Appends records to ``path``; rotates at ``max_bytes`` (0: never, leave it to the
    system's log rotation) keeping ``keep`` old files ``path.1`` .. ``path.<keep>``."""

    def __init__(
        self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = path.with_name(path.name + ".lock")
        # A write that the file system refused part-way (disk full) left a line without
        # its end: the next record starts on a line of its own.
        self._torn = False
        self._fd = self._open()

    def _open(self) -> int:
        # Unbuffered append: each record is one write(2) of one line, so records of several
        # worker processes interleave whole, and a record the file system refused (disk
        # full) is not kept in a buffer to appear later, after a call it was refused for
        # was answered INTERNAL.
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def _reopen_if_moved(self) -> int:
        """Another process (or logrotate) renamed the file: write to the new one. Returns
        the size of the file written to."""
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = -1
        st = os.fstat(self._fd)
        if current != st.st_ino:
            os.close(self._fd)
            self._fd = self._open()
            self._torn = False
            st = os.fstat(self._fd)
        return st.st_size

    def _rotate(self) -> None:
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            # Another worker may have rotated already: only the file we hold, once.
            if st is not None and st.st_ino == os.fstat(self._fd).st_ino and (
                st.st_size >= self.max_bytes
            ):
                for n in range(self.keep - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{n}")
                    if older.exists():
                        os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
                if self.keep > 0:
                    os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
                else:
                    os.unlink(self.path)
            os.close(self._fd)
            self._fd = self._open()
            self._torn = False

    def emit(self, record: Mapping[str, object]) -> None:
        line = bounded_record(record) + "\n"  # ASCII (json.dumps escapes the rest)
        with self._lock:
            size = self._reopen_if_moved()
            data = ("\n" + line if self._torn else line).encode("ascii")
            self._write(data)  # one write(2), before the response is sent
            if self.max_bytes and size + len(data) >= self.max_bytes:
                self._rotate()

    def _write(self, data: bytes) -> None:
        """All of ``data`` or an OSError (the caller's call is then answered INTERNAL):
        nothing is kept to be written later."""
        done = os.write(self._fd, data)
        if done == len(data):
            self._torn = False
            return
        self._torn = True  # part of the line is in the file: end it before the next one
        done += os.write(self._fd, data[done:])  # disk full: raises, the line stays torn
        if done != len(data):
            raise OSError(errno.ENOSPC, "audit record written only in part")
        self._torn = False

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0


class LoggingAuditSink:
    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("kms.audit")

    def emit(self, record: Mapping[str, object]) -> None:
        self.logger.info(bounded_record(record))
