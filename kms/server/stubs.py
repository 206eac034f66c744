"""The generated gRPC stubs for ``proto/mikey/kms/v1/kms.proto``, loaded in one place.

The stubs are generated at build time by ``setup.py`` into ``kms/_generated`` (gitignored),
so a fresh checkout has none until ``pip install -e .`` runs. Importing them by name through
importlib keeps mypy independent of whether they exist and of the generated code's typing
(there is no ``.pyi`` for the ``_grpc`` module); everything here is deliberately ``Any``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

PACKAGE = "kms._generated.mikey.kms.v1"
SERVICE_NAME = "mikey.kms.v1.KeyManagement"
METHOD_REQUEST = f"/{SERVICE_NAME}/RequestTicket"
METHOD_RESOLVE = f"/{SERVICE_NAME}/ResolveTicket"


class StubsMissing(ImportError):
    """The generated code is absent: the package was not built/installed from this tree."""


def _load(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"{PACKAGE}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.startswith("kms._generated"):
            raise StubsMissing(
                "the gRPC stubs were not generated; run `pip install -e .` in the source tree "
                "(setup.py generates them from proto/)"
            ) from None
        raise


kms_pb2: Any = _load("kms_pb2")
kms_pb2_grpc: Any = _load("kms_pb2_grpc")

#: The message type of both RPCs (``data``: one complete MIKEY message).
MikeyMessage: Any = kms_pb2.MikeyMessage
#: The file descriptor (for server reflection).
DESCRIPTOR: Any = kms_pb2.DESCRIPTOR

assert DESCRIPTOR.services_by_name["KeyManagement"].full_name == SERVICE_NAME


def client_stub(channel: Any) -> Any:
    """A ``KeyManagementStub`` over ``channel`` (for clients and tests)."""
    return kms_pb2_grpc.KeyManagementStub(channel)


__all__ = [
    "DESCRIPTOR",
    "METHOD_REQUEST",
    "METHOD_RESOLVE",
    "SERVICE_NAME",
    "MikeyMessage",
    "StubsMissing",
    "client_stub",
    "kms_pb2",
    "kms_pb2_grpc",
]
