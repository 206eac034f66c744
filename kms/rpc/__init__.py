"""The gRPC wire contract of ``proto/mikey/kms/v1/kms.proto``, shared by server and endpoints.

``kms_pb2.py`` / ``kms_pb2.pyi`` next to this file are protoc's output for that proto,
committed unchanged (``tests/test_generated.py`` regenerates them with
``grpc_tools.protoc -I proto --python_out --pyi_out`` and fails on any difference; how to
regenerate: docs/wire.md). The proto is compiled with
``-I proto`` so that its registered file name stays ``mikey/kms/v1/kms.proto``, which is what
reflection clients see.

The service glue that protoc's gRPC plugin would write (``kms_pb2_grpc.py``: an untyped
module whose one absolute import would need a top-level ``mikey`` package) is these few typed
lines instead: the two unary methods, the client stub and the server registration.

The metadata keys of the contract are defined here once: the server sets them, the endpoint
library and the federation client read them.
"""

from __future__ import annotations

from typing import Any, Protocol

import grpc

from kms.rpc.kms_pb2 import DESCRIPTOR, MikeyMessage

SERVICE_NAME = "mikey.kms.v1.KeyManagement"
METHOD_REQUEST = f"/{SERVICE_NAME}/RequestTicket"
METHOD_RESOLVE = f"/{SERVICE_NAME}/ResolveTicket"

#: Trailing metadata (binary) carrying the MIKEY error message of a refusal (RFC 6043 5.4).
ERROR_TRAILER = "mikey-error-bin"
#: Initial and trailing metadata linking a call across client, KMS and peer KMS logs.
CORRELATION_KEY = "x-correlation-id"

assert DESCRIPTOR.services_by_name["KeyManagement"].full_name == SERVICE_NAME


class KeyManagementServicer(Protocol):
    """What a KeyManagement server implements (both methods: MIKEY message in and out)."""

    def RequestTicket(self, request: MikeyMessage, context: Any) -> MikeyMessage: ...  # noqa: N802

    def ResolveTicket(self, request: MikeyMessage, context: Any) -> MikeyMessage: ...  # noqa: N802


class KeyManagementStub:
    """Client stub: ``RequestTicket`` and ``ResolveTicket`` are gRPC unary-unary callables
    (call them with a :class:`MikeyMessage`, or use ``.with_call`` for the metadata)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.RequestTicket: Any = channel.unary_unary(
            METHOD_REQUEST,
            request_serializer=MikeyMessage.SerializeToString,
            response_deserializer=MikeyMessage.FromString,
            _registered_method=True,
        )
        self.ResolveTicket: Any = channel.unary_unary(
            METHOD_RESOLVE,
            request_serializer=MikeyMessage.SerializeToString,
            response_deserializer=MikeyMessage.FromString,
            _registered_method=True,
        )


def client_stub(channel: grpc.Channel) -> KeyManagementStub:
    """A :class:`KeyManagementStub` over ``channel`` (for clients and tests)."""
    return KeyManagementStub(channel)


def add_servicer(servicer: KeyManagementServicer, server: grpc.Server) -> None:
    """Register ``servicer``'s two methods on ``server``."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=MikeyMessage.FromString,
            response_serializer=MikeyMessage.SerializeToString,
        )
        for name, fn in (
            ("RequestTicket", servicer.RequestTicket),
            ("ResolveTicket", servicer.ResolveTicket),
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


__all__ = [
    "CORRELATION_KEY",
    "DESCRIPTOR",
    "ERROR_TRAILER",
    "METHOD_REQUEST",
    "METHOD_RESOLVE",
    "SERVICE_NAME",
    "KeyManagementServicer",
    "KeyManagementStub",
    "MikeyMessage",
    "add_servicer",
    "client_stub",
]
