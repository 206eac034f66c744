"""Audit sinks: one JSON object per line, to a file or a logger. Never key material: the
core puts only identities, ticket ids, decisions and reasons in records."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path


class JsonLinesAuditSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Line-buffered append: each record is one write(2) of one line, so records of
        # several worker processes interleave whole.
        self._fh = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def emit(self, record: Mapping[str, object]) -> None:
        line = json.dumps(record, sort_keys=True, default=str, separators=(",", ":"))
        with self._lock:
            self._fh.write(line + "\n")

    def close(self) -> None:
        self._fh.close()


class LoggingAuditSink:
    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("kms.audit")

    def emit(self, record: Mapping[str, object]) -> None:
        self.logger.info(json.dumps(record, sort_keys=True, default=str))
