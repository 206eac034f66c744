"""`kms serve` when its registry is gone: the call is refused with UNAVAILABLE and a MIKEY
error message in ``mikey-error-bin``, and the audit log gets exactly one record for it (the
core used to let the registry error escape: INTERNAL, no MIKEY error, no audit record)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc

from hsm.software import SoftwareKeyStore
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.mikey.constants import DataType, ErrorNo, IdType
from kms.mikey.message import Message
from kms.mikey.payloads import Error
from kms.server.config import load_config
from kms.store.registry import REGISTRY_FILE
from tests.server.test_grpc_serve import request


def test_registry_gone_is_unavailable_with_one_audit_record(
    serve_home: Path, serve_proc: Any, free_port: Any
) -> None:
    port = free_port()
    p = serve_proc(serve_home, "--listen", f"127.0.0.1:{port}")
    p.wait_ready()
    for suffix in ("", "-wal", "-shm"):
        (serve_home / (REGISTRY_FILE + suffix)).unlink(missing_ok=True)
    kms_id = load_config(serve_home).kms_id_bytes
    ini = Initiator(
        Credentials(b"sip:alice@example.org", bytes(16), kms_id, IdType.URI),
        SoftwareKeyStore(),
    )
    wire, _ = ini.request_ticket(DesiredPolicy((b"sip:bob@example.org",)), time.time())
    audit = serve_home / "audit.log"
    before = audit.read_text().splitlines() if audit.exists() else []
    code, details, trailing = request(f"127.0.0.1:{port}", wire)
    assert code is grpc.StatusCode.UNAVAILABLE, details
    assert details == "KMS store unavailable"
    err = Message.decode(trailing["mikey-error-bin"])
    assert err.data_type == DataType.ERROR and err.one(Error).error_no == ErrorNo.UNSPECIFIED
    records = [json.loads(x) for x in audit.read_text().splitlines()[len(before) :]]
    assert len(records) == 1, records
    assert records[0]["outcome"] == "unavailable"
    assert records[0]["reason"].startswith("registry: ")
    assert records[0]["correlation_id"] == trailing["x-correlation-id"]
    assert p.terminate() == 0, p.stderr
