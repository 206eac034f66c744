"""The committed protobuf code in kms/rpc/ is exactly what protoc makes of the proto today.

CI runs this: editing ``proto/mikey/kms/v1/kms.proto`` (or moving to another grpcio-tools)
without regenerating fails here. To regenerate, run the command in docs/wire.md.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import grpc
from grpc_tools import protoc

from kms import rpc

ROOT = Path(__file__).resolve().parents[1]
PROTO = Path("mikey/kms/v1/kms.proto")
GENERATED = ("kms_pb2.py", "kms_pb2.pyi")


def test_committed_code_matches_a_fresh_protoc_run(tmp_path: Path) -> None:
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        str(ROOT / "proto" / PROTO),
    ]
    assert protoc.main(args) == 0
    for name in GENERATED:
        fresh = (tmp_path / PROTO.parent / name).read_text(encoding="utf-8")
        committed = (ROOT / "kms" / "rpc" / name).read_text(encoding="utf-8")
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                fresh.splitlines(keepends=True),
                f"kms/rpc/{name} (committed)",
                f"{name} (protoc)",
            )
        )
        assert diff == "", f"kms/rpc/{name} is stale; regenerate it:\n{diff}"


def test_the_service_glue_matches_the_proto() -> None:
    service = rpc.DESCRIPTOR.services_by_name["KeyManagement"]
    assert rpc.DESCRIPTOR.name == str(PROTO)  # what reflection clients see
    assert {m.name for m in service.methods} == {"RequestTicket", "ResolveTicket"}
    for m in service.methods:
        assert m.input_type.full_name == m.output_type.full_name == "mikey.kms.v1.MikeyMessage"
        assert f"/{service.full_name}/{m.name}" in (rpc.METHOD_REQUEST, rpc.METHOD_RESOLVE)


def test_the_build_generates_nothing() -> None:
    # No build hook: the package is pyproject-only and nothing is generated into the tree.
    assert not (ROOT / "setup.py").exists()
    assert not (ROOT / "kms" / "_generated").exists()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "grpcio-tools" not in pyproject.split("[project]")[0]  # not a build requirement


def test_stub_round_trip_over_a_real_channel() -> None:
    # The hand-written glue against a real server on a free loopback port.
    from concurrent import futures

    class Echo:
        def RequestTicket(self, request: rpc.MikeyMessage, context: object) -> rpc.MikeyMessage:
            return rpc.MikeyMessage(data=b"req:" + request.data)

        def ResolveTicket(self, request: rpc.MikeyMessage, context: object) -> rpc.MikeyMessage:
            return rpc.MikeyMessage(data=b"res:" + request.data)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_servicer(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rpc.client_stub(channel)
            assert stub.RequestTicket(rpc.MikeyMessage(data=b"\x01"), timeout=10).data == (
                b"req:\x01"
            )
            assert stub.ResolveTicket(rpc.MikeyMessage(data=b"\x02"), timeout=10).data == (
                b"res:\x02"
            )
    finally:
        server.stop(None)
