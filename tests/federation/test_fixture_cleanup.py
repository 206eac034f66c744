"""A federation setup that fails half-way leaves nothing running: the relay's gRPC server and
worker threads stopped, its channels closed, the KMS processes started so far killed. (A gRPC
server or channel left behind keeps polling a completion queue whose file descriptors are
gone: "Completion queue next failed: epoll_wait: Bad file descriptor", in a loop.)

The homes and `kms serve` processes are stood in for (no provisioning, a sleeping child
process per domain): what is checked is the cleanup of what the setup itself started."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.federation import conftest
from tests.federation.conftest import Domain, Relay, federation


class StandIn:
    """What Domain.start leaves in ``serve``: a child process with ``kill``."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def half_way(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Records what the setup makes, with provisioning and `kms serve` stood in for."""
    made: dict[str, list[Any]] = {"relays": [], "channels": [], "serves": []}
    relay_init, relay_connect = Relay.__init__, Relay.connect
    real_channel = grpc.secure_channel

    def init(self: Relay, *args: Any) -> None:
        relay_init(self, *args)
        made["relays"].append(self)

    def channel(*args: Any, **kwargs: Any) -> grpc.Channel:
        c = real_channel(*args, **kwargs)
        made["channels"].append(c)
        return c

    def start(self: Domain) -> None:
        self.serve = StandIn()  # type: ignore[assignment]
        made["serves"].append(self.serve)

    monkeypatch.setattr(Relay, "__init__", init)
    monkeypatch.setattr(grpc, "secure_channel", channel)
    monkeypatch.setattr(Domain, "start", start)
    monkeypatch.setattr(conftest, "_provision", lambda *args: None)
    made["connect"] = [relay_connect]
    return made


def fail_on_connect_to(name: str, real: Any) -> Any:
    def connect(self: Relay, to: str, address: str) -> None:
        real(self, to, address)
        if to == name:
            raise RuntimeError("setup failed half-way")

    return connect


def accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def closed(channel: grpc.Channel) -> bool:
    try:
        channel.unary_unary("/x/y")(b"", timeout=0.01)
    except ValueError:  # "Cannot invoke RPC on closed channel!"
        return True
    except grpc.RpcError:
        return False
    return False


def new_threads_gone(before: set[int], wait_s: float = 5.0) -> list[str]:
    """Threads started since ``before`` that are still alive (given a moment to end)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.mark.parametrize("failing", ["provision", "connect"])
def test_a_failed_setup_leaves_no_server_channel_thread_or_process(
    failing: str, half_way: dict[str, list[Any]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if failing == "provision":
        def provision(*args: Any) -> None:
            raise RuntimeError("setup failed half-way")

        monkeypatch.setattr(conftest, "_provision", provision)
    else:
        monkeypatch.setattr(Relay, "connect", fail_on_connect_to("C", half_way["connect"][0]))
    before = {t.ident for t in threading.enumerate() if t.ident is not None}
    with pytest.raises(RuntimeError, match="half-way"), federation(tmp_path):
        raise AssertionError("the setup should have failed")
    [relay] = half_way["relays"]
    assert not accepts(relay.port), "the relay's gRPC server still listens"
    assert new_threads_gone(before) == []
    assert all(closed(c) for c in half_way["channels"])
    assert all(s.proc.poll() is not None for s in half_way["serves"])
    if failing == "connect":  # it got as far as starting every domain and one channel
        assert len(half_way["serves"]) == 3 and len(half_way["channels"]) == 2
    else:
        assert half_way["serves"] == [] and half_way["channels"] == []
