"""Fixtures for the gRPC service tests: free ports, channels, `kms serve` subprocesses.

The fixtures are named grpc_* / serve_* so that they cannot shadow the ``home`` fixtures the
home and config tests define for themselves.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
READY_RE = re.compile(r"^kms: serving on (\S+) \((\d+) workers?\)$", re.MULTILINE)


def free_port() -> int:
    """A port that was free a moment ago (the kernel's choice for an ephemeral bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health_status(target: str, service: str = "", timeout: float = 2.0) -> str:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


class ServeProcess:
    """A `kms serve` subprocess; output goes to files so that a full pipe never blocks it."""

    def __init__(self, home: Path, tmp: Path, *args: str) -> None:
        self.home = home
        self.out_path = tmp / f"serve-{time.monotonic_ns()}.out"
        self.err_path = tmp / f"serve-{time.monotonic_ns()}.err"
        self._out = self.out_path.open("wb")
        self._err = self.err_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kms.cli", "--home", str(home), "serve", *args],
            stdout=self._out,
            stderr=self._err,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Wait for the ready line; return the address it names."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = READY_RE.search(self.stdout)
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"kms serve exited {self.proc.returncode}:\n{self.stdout}\n{self.stderr}"
                )
            time.sleep(0.05)
        raise AssertionError(f"kms serve not ready:\n{self.stdout}\n{self.stderr}")

    def terminate(self, timeout: float = 15.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()
            self._err.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            # The whole tree: the parent's workers must not outlive a failed test.
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)
        self._out.close()
        self._err.close()


@pytest.fixture(name="free_port")
def free_port_fixture() -> Any:
    """free_port() -> a port on 127.0.0.1 that was free a moment ago."""
    return free_port


@pytest.fixture(name="health_status")
def health_status_fixture() -> Any:
    """health_status(target, service="") -> "SERVING" / "NOT_SERVING" / ..."""
    return health_status


@pytest.fixture
def serve_proc(tmp_path: Path) -> Iterator[Any]:
    """serve_proc(home, *args) -> ServeProcess; killed at the end of the test if still up."""
    with contextlib.ExitStack() as stack:  # every process started is killed, even if one fails

        def start(home: Path, *args: str) -> ServeProcess:
            p = ServeProcess(home, tmp_path, *args)
            stack.callback(p.kill)
            return p

        yield start


def copy_home(src: Path, dst: Path) -> Path:
    """Copy a KMS home; point the copy's softhsm2.conf at the copied token directory."""
    shutil.copytree(src, dst, symlinks=True)
    conf = dst / "token" / "softhsm2.conf"
    text = conf.read_text()
    text = re.sub(
        r"^directories\.tokendir = .*$",
        f"directories.tokendir = {dst / 'token' / 'tokens'}",
        text,
        flags=re.MULTILINE,
    )
    conf.write_text(text)
    return dst


@pytest.fixture(scope="session")
def serve_pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A home initialised BY `kms serve` on an empty folder (this is also the test that
    `kms serve` just works on a fresh machine): (home, serve's stdout)."""
    assert shutil.which("softhsm2-util"), "softhsm2-util is required (scripts/setup.sh)"
    tmp = tmp_path_factory.mktemp("serve-pristine")
    home = tmp / "home"
    port = free_port()
    p = ServeProcess(home, tmp, "--listen", f"127.0.0.1:{port}")
    try:
        p.wait_ready(60)
        assert health_status(f"127.0.0.1:{port}") == "SERVING"
        assert p.terminate() == 0, p.stderr
    finally:
        p.kill()
    return home, p.stdout + p.stderr


@pytest.fixture
def serve_home(serve_pristine: tuple[Path, str], tmp_path: Path) -> Path:
    """A private copy of an initialised home (its own token files)."""
    return copy_home(serve_pristine[0], tmp_path / "home")
