"""`kms serve` as a subprocess on a real home and SoftHSM token: initialisation of an empty
home, readiness, health, the real KMS core behind it, SIGTERM drain, restart, several
workers, TLS / mutual TLS, and the refusals (plaintext off loopback, a second server)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kms import rpc
from tests.server.tls_pki import pem

REPO = Path(__file__).resolve().parents[2]


def request(target: str, data: bytes, creds: Any = None) -> tuple[Any, Any, Any]:
    """RequestTicket -> (code, details, trailing metadata as a dict)."""
    channel = (
        grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds)
    )
    with channel:
        try:
            _, call = rpc.client_stub(channel).RequestTicket.with_call(
                rpc.MikeyMessage(data=data), timeout=5
            )
        except grpc.RpcError as err:
            e: Any = err
            return e.code(), e.details(), dict(e.trailing_metadata() or ())
        return call.code(), call.details(), dict(call.trailing_metadata())


def run_kms(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kms.cli", "--home", str(home), *args],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("{")]  # JSON logs
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("kms: error: ")
    assert re.search(pattern, errors[0]), errors[0]


def test_serve_initialises_an_empty_home(serve_pristine: tuple[Path, str]) -> None:
    home, output = serve_pristine
    assert (home / "kms.toml").is_file()
    assert (home / "token" / "pin").is_file()
    kms_id = re.search(r'^id = "(.*)"$', (home / "kms.toml").read_text(), re.M)
    assert kms_id and kms_id.group(1).startswith("kms:")
    assert f"has no kms.toml: initialising a KMS home for {kms_id.group(1)}" in output
    assert "generating TPK version 1" in output
    pin = (home / "token" / "pin").read_text().strip()
    assert pin not in output


def test_serve_real_core_health_sigterm_and_restart(
    serve_home: Path, serve_proc: Any, free_port: Any, health_status: Any
) -> None:
    port = free_port()
    p = serve_proc(serve_home, "--listen", f"127.0.0.1:{port}", "--grace", "5")
    assert p.wait_ready() == f"127.0.0.1:{port}"
    assert p.stdout.splitlines()[-1] == f"kms: serving on 127.0.0.1:{port} (1 worker)"
    target = f"127.0.0.1:{port}"
    assert health_status(target, "") == "SERVING"
    assert health_status(target, "mikey.kms.v1.KeyManagement") == "SERVING"

    # End to end through the real KMS core: a malformed REQUEST_INIT is INVALID_ARGUMENT.
    code, details, trailing = request(target, b"\x01\x02 not MIKEY")
    assert code is grpc.StatusCode.INVALID_ARGUMENT, details
    assert details and "\n" not in details
    assert len(trailing["x-correlation-id"]) == 32

    t0 = time.monotonic()
    assert p.terminate(timeout=10) == 0, p.stderr
    assert time.monotonic() - t0 < 5
    logs = [json.loads(ln) for ln in p.stderr.splitlines() if ln.startswith("{")]
    assert any(e["msg"] == "stopping" and e["signal"] == "SIGTERM" for e in logs)
    assert any(e["msg"] == "stopped" and e["clean"] is True for e in logs)
    assert "not MIKEY" not in p.stderr  # request bytes are never logged

    # The same home serves again (the token, the lock and the port were released).
    again = serve_proc(serve_home, "--listen", f"127.0.0.1:{port}")
    again.wait_ready()
    assert health_status(target) == "SERVING"
    assert again.terminate() == 0, again.stderr


def test_readiness_follows_the_token(
    serve_home: Path, serve_proc: Any, free_port: Any, health_status: Any
) -> None:
    """The KMS service's health is its readiness: NOT_SERVING while the token is gone (its
    calls would be UNAVAILABLE), SERVING again when the token is back, without a call or a
    restart; the overall health (liveness) stays SERVING throughout."""
    port = free_port()
    p = serve_proc(serve_home, "--listen", f"127.0.0.1:{port}")
    target = p.wait_ready()
    service = rpc.SERVICE_NAME

    def wait_for(status: str) -> None:
        deadline = time.monotonic() + 30  # the probe runs every TOKEN_PROBE_S (5 s)
        while health_status(target, service) != status and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health_status(target, service) == status, p.stderr

    assert health_status(target, service) == "SERVING"
    tokens = serve_home / "token" / "tokens"
    away = serve_home.parent / "tokens-moved-away"
    shutil.move(tokens, away)
    try:
        wait_for("NOT_SERVING")
        assert health_status(target, "") == "SERVING"
    finally:
        shutil.move(away, tokens)
    wait_for("SERVING")
    assert health_status(target, "") == "SERVING"
    assert p.terminate() == 0, p.stderr


def test_second_server_on_same_home_is_refused(
    serve_home: Path, serve_proc: Any, free_port: Any
) -> None:
    p = serve_proc(serve_home, "--listen", f"127.0.0.1:{free_port()}")
    p.wait_ready()
    proc = run_kms(serve_home, "serve", "--listen", f"127.0.0.1:{free_port()}")
    assert_one_line_error(proc, rf"another `kms serve` \(pid {p.proc.pid}\) is running")
    assert p.terminate() == 0


def test_port_in_use_is_refused(serve_home: Path, serve_proc: Any, free_port: Any) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        for workers in ("1", "2"):
            proc = run_kms(serve_home, "serve", "--listen", f"127.0.0.1:{port}",
                           "--workers", workers)
            assert_one_line_error(proc, rf"cannot listen on 127\.0\.0\.1:{port}")


def test_plaintext_on_non_loopback_refused(serve_home: Path, free_port: Any) -> None:
    proc = run_kms(serve_home, "serve", "--listen", f"0.0.0.0:{free_port()}")
    assert_one_line_error(proc, r"refusing plaintext gRPC on non-loopback address 0\.0\.0\.0:")

    toml = serve_home / "kms.toml"
    toml.write_text(re.sub(r'^listen = .*$', 'listen = "0.0.0.0:50051"', toml.read_text(),
                           flags=re.M))
    proc = run_kms(serve_home, "serve")
    assert_one_line_error(proc, r"\[server\] listen: 0\.0\.0\.0:50051 is not a loopback")


def _pids_of_children(pid: int) -> set[int]:
    """The supervisor's worker processes (multiprocessing also starts a resource tracker,
    which is not a worker)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            found.add(int(stat.parent.name))
    return found


def test_workers_share_the_port_restart_and_stop(
    serve_home: Path, serve_proc: Any, free_port: Any, health_status: Any
) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    p = serve_proc(serve_home, "--listen", target, "--workers", "2")
    p.wait_ready()
    assert p.stdout.splitlines()[-1] == f"kms: serving on {target} (2 workers)"
    workers = _pids_of_children(p.proc.pid)
    assert len(workers) == 2
    for _ in range(4):  # fresh connections: the kernel spreads them over the workers
        assert request(target, b"junk")[0] is grpc.StatusCode.INVALID_ARGUMENT

    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = _pids_of_children(p.proc.pid)
        if len(now) == 2 and victim not in now and '"msg": "worker ready"' in p.stderr:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker not restarted: {p.stderr}")
    assert health_status(target) == "SERVING"
    assert '"msg": "worker died; restarting"' in p.stderr

    survivors = _pids_of_children(p.proc.pid)
    assert p.terminate() == 0, p.stderr
    for pid in survivors:  # every worker drained and exited, none orphaned
        assert not Path(f"/proc/{pid}").exists()


# ------------------------------------------------------------------------------------------
# TLS


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str, key: Any, issuer: str, issuer_key: Any, *, ca: bool = False,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def test_mutual_tls_from_kms_toml(
    serve_home: Path, serve_proc: Any, free_port: Any, tmp_path: Path
) -> None:
    ca_key, client_key, server_key = _key(), _key(), _key()
    ca = _cert("test CA", ca_key, "test CA", ca_key, ca=True)
    server = _cert("kms", server_key, "test CA", ca_key,
                   san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _cert("sip:alice@example.org", client_key, "test CA", ca_key)
    (serve_home / "tls").mkdir()
    for name, obj in (("ca.pem", ca), ("server.pem", server), ("server.key", server_key)):
        (serve_home / "tls" / name).write_bytes(pem(obj))
    toml = serve_home / "kms.toml"
    text = toml.read_text()
    text = text.replace('# tls_cert = "server.pem"', 'tls_cert = "tls/server.pem"')
    text = text.replace('# tls_key = "server.key"', 'tls_key = "tls/server.key"')
    text = re.sub(r'^# tls_client_ca = .*$', 'tls_client_ca = "tls/ca.pem"', text, flags=re.M)
    toml.write_text(text)

    port = free_port()
    target = f"127.0.0.1:{port}"
    p = serve_proc(serve_home, "--listen", target)
    p.wait_ready()
    assert '"tls": "mutual TLS"' in p.stderr

    with_cert = grpc.ssl_channel_credentials(pem(ca), pem(client_key), pem(client))
    assert request(target, b"junk", with_cert)[0] is grpc.StatusCode.INVALID_ARGUMENT
    without_cert = grpc.ssl_channel_credentials(pem(ca))
    assert request(target, b"junk", without_cert)[0] is grpc.StatusCode.UNAVAILABLE
    assert request(target, b"junk")[0] is grpc.StatusCode.UNAVAILABLE  # plaintext client
    assert p.terminate() == 0, p.stderr


def test_unreadable_tls_key_is_a_one_line_error(serve_home: Path, free_port: Any) -> None:
    toml = serve_home / "kms.toml"
    text = toml.read_text()
    text = text.replace('# tls_cert = "server.pem"', 'tls_cert = "missing.pem"')
    text = text.replace('# tls_key = "server.key"', 'tls_key = "missing.key"')
    toml.write_text(text)
    proc = run_kms(serve_home, "serve", "--listen", f"127.0.0.1:{free_port()}")
    assert_one_line_error(proc, r"cannot read TLS certificate .*missing\.pem")


@pytest.mark.parametrize("bad", ["--workers=0", "--grace=-1", "--log-level=LOUD"])
def test_bad_arguments(serve_home: Path, bad: str) -> None:
    proc = run_kms(serve_home, "serve", bad)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
