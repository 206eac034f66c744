"""Build hook: generate the gRPC stubs from proto/ at build time (never committed).

Everything else about the package is declared in pyproject.toml. This file only replaces
``build_py`` so that both ``pip install .`` (wheel) and ``pip install -e .`` (editable) run
``grpc_tools.protoc`` first:

    proto/mikey/kms/v1/kms.proto  ->  kms/_generated/mikey/kms/v1/kms_pb2.py, kms_pb2.pyi,
                                      kms_pb2_grpc.py  (+ __init__.py in every folder)

Generating into the source tree (gitignored) is what makes the editable install work: its
import finder maps ``kms`` to the source folder. The proto file is compiled with ``-I proto``
so its registered name stays ``mikey/kms/v1/kms.proto`` (what reflection clients expect);
the one absolute import protoc writes into ``kms_pb2_grpc.py`` (``from mikey.kms.v1 import``)
is rewritten to a relative one so that no top-level ``mikey`` package is needed.
"""

from __future__ import annotations

import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "kms" / "_generated"


def generate_stubs() -> list[str]:
    """Run protoc over every .proto under proto/; return the generated package names."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    if not protos:
        if (OUT_ROOT / "__init__.py").exists():  # building from an sdist made without proto/
            return _packages()
        raise SystemExit(f"setup.py: no .proto files under {PROTO_ROOT}")
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:  # build-system requires lists it; this is a plain `setup.py` run
        raise SystemExit("setup.py: grpcio-tools is required to generate the gRPC stubs") from None

    OUT_ROOT.mkdir(parents=True, exist_ok=True)
    # protoc's own well-known types (google/protobuf/*.proto) ship inside grpc_tools.
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{wkt}",
        f"--python_out={OUT_ROOT}",
        f"--pyi_out={OUT_ROOT}",
        f"--grpc_python_out={OUT_ROOT}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("setup.py: grpc_tools.protoc failed")

    for proto in protos:
        rel = proto.relative_to(PROTO_ROOT)
        grpc_file = OUT_ROOT / rel.parent / f"{rel.stem}_pb2_grpc.py"
        module = ".".join(rel.parent.parts)
        text = grpc_file.read_text(encoding="utf-8")
        # `from mikey.kms.v1 import kms_pb2 as ...` -> `from . import kms_pb2 as ...`
        text = re.sub(rf"^from {re.escape(module)} import ", "from . import ", text, flags=re.M)
        grpc_file.write_text(text, encoding="utf-8")
    for folder in [OUT_ROOT, *(p for p in OUT_ROOT.rglob("*") if p.is_dir())]:
        if folder.name != "__pycache__":
            (folder / "__init__.py").touch()
    return _packages()


def _packages() -> list[str]:
    return sorted(
        ".".join(p.parent.relative_to(ROOT).parts) for p in OUT_ROOT.rglob("__init__.py")
    )


class BuildPyWithStubs(build_py):
    """build_py that generates the stubs first (also runs for editable installs)."""

    def run(self) -> None:
        generated = generate_stubs()
        # Package discovery ran before the stubs existed on a fresh checkout: add them so
        # that a regular (non-editable) wheel contains them too.
        packages = list(self.packages or [])
        for pkg in generated:
            if pkg not in packages:
                packages.append(pkg)
        self.packages = packages
        self.distribution.packages = packages
        super().run()


class SdistWithProto(sdist):
    """sdist that ships proto/ (without a MANIFEST.in it would be left out)."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        protos = [str(p.relative_to(ROOT)) for p in PROTO_ROOT.rglob("*.proto")]
        super().make_release_tree(base_dir, [*files, *protos])


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProto})
