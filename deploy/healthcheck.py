"""Container HEALTHCHECK: gRPC health checking (grpc.health.v1) of the KMS service.

Exit 0 when ``mikey.kms.v1.KeyManagement`` is SERVING, 1 otherwise. It connects to
127.0.0.1 on the port of KMS_LISTEN, in plaintext or, when KMS_TLS_CERT is set, over TLS
trusting KMS_HEALTH_CA (default: KMS_TLS_CERT itself, right for a self-signed certificate)
and expecting the name KMS_HEALTH_TLS_NAME (default: localhost). With mutual TLS it presents
KMS_HEALTH_CERT / KMS_HEALTH_KEY; without those it can only check that the port accepts
connections.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "mikey.kms.v1.KeyManagement"


def main() -> int:
    listen = os.environ.get("KMS_LISTEN", "0.0.0.0:50051")
    port = int(listen.rsplit(":", 1)[1])
    target = f"127.0.0.1:{port}"
    cert = os.environ.get("KMS_TLS_CERT")
    if cert and os.environ.get("KMS_TLS_CLIENT_CA") and not os.environ.get("KMS_HEALTH_CERT"):
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            return 0
    if cert:
        client_cert = os.environ.get("KMS_HEALTH_CERT")
        client_key = os.environ.get("KMS_HEALTH_KEY")
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(os.environ.get("KMS_HEALTH_CA", cert)).read_bytes(),
            private_key=Path(client_key).read_bytes() if client_key else None,
            certificate_chain=Path(client_cert).read_bytes() if client_cert else None,
        )
        name = os.environ.get("KMS_HEALTH_TLS_NAME", "localhost")
        channel = grpc.secure_channel(
            target, creds, options=[("grpc.ssl_target_name_override", name)]
        )
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=3)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # any failure is "unhealthy", with one line for `docker inspect`
        first = (str(exc).strip().splitlines() or [""])[0]
        if isinstance(exc, grpc.RpcError):
            err: object = exc
            first = f"{err.code().name}: {err.details()}"  # type: ignore[attr-defined]
        print(f"unhealthy: {type(exc).__name__}: {first}", file=sys.stderr)
        sys.exit(1)
