"""Three KMS domains on loopback for the federation tests (RFC 6043 9), started ONCE per module.

Each KMS is a `kms serve` subprocess with its own home and SoftHSM token, provisioned with the
operator CLI only (`kms init`, `kms endpoint add`, `kms peer add`). Every KMS listens with
mutual TLS (certificates from a throw-away CA made here), so KMS-to-KMS calls are mutual TLS
and endpoints present a client certificate too.

    A (kms:a.example)  Alice            peer B: may resolve for sip:*@b.example
    B (kms:b.example)  Bob, Bob2, Bob3, peer A: at A's address
                       Carol-at-B       peer C: at the RELAY's address (deadline 1.5 s)
    C (kms:c.example)  Carol            peer B: may resolve for sip:*@b.example, 5/s

The relay is a KeyManagement server inside the test process sitting on B's route to C: it
passes calls through to C, or plays a broken or lying peer (slow, forged MAC, a stale
answer, forwarding back to B). A and C do not know each other.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from hsm.software import SoftwareKeyStore
from kms import rpc
from kms.endpoint.client import KmsClient
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import Initiator
from kms.endpoint.responder import Responder
from kms.mikey.constants import IdType
from tests.e2e.harness import ServeProcess, free_port, run_kms
from tests.federation.pki import CertFiles, TestCa

A_ID, B_ID, C_ID = "kms:a.example", "kms:b.example", "kms:c.example"
ALICE = b"sip:alice@a.example"
BOB = b"sip:bob@b.example"
BOB2 = b"sip:bob2@b.example"
BOB3 = b"sip:bob3@b.example"
CAROL = b"sip:carol@c.example"
PSKS: dict[bytes, bytes] = {
    ALICE: bytes.fromhex("a1" * 16),
    BOB: bytes.fromhex("b0" * 16),
    BOB2: bytes.fromhex("b2" * 16),
    BOB3: bytes.fromhex("b3" * 16),
    CAROL: bytes.fromhex("c1" * 16),
}
CAROL_AT_B_PSK = bytes.fromhex("cb" * 16)  # Carol registered at B too (a second account)
AB_KEY = bytes.fromhex("ab" * 32)  # generated once, given to the operators of A and B
BC_KEY = bytes.fromhex("bc" * 32)
DEADLINE_B_TO_A_MS = 2000
DEADLINE_B_TO_C_MS = 1500
C_RATE_FOR_B = 5


class Relay:
    """A KeyManagement server on B's route to C. ``mode``: "pass" (to C), "slow" (answers
    after the deadline), "forge" (C's answer with one MAC byte flipped), "stale" (the last
    answer C gave, to an earlier request), "loop" (forwards back to B, one hop more)."""

    def __init__(self, ca: TestCa, cert: CertFiles) -> None:
        self.mode = "pass"
        self.calls: list[dict[str, str]] = []
        self.last_answer: bytes | None = None
        self.release = threading.Event()
        self.upstream: dict[str, Any] = {}
        self._channels: list[grpc.Channel] = []
        creds = grpc.ssl_server_credentials(
            [(cert.key_pem, cert.cert_pem)],
            root_certificates=ca.path.read_bytes(),
            require_client_auth=True,
        )
        self._client_creds = grpc.ssl_channel_credentials(
            ca.path.read_bytes(), cert.key_pem, cert.cert_pem
        )
        self._pool = futures.ThreadPoolExecutor(max_workers=8)
        self.server = grpc.server(self._pool)
        try:
            rpc.add_servicer(self, self.server)
            self.port = self.server.add_secure_port("127.0.0.1:0", creds)
            self.address = f"127.0.0.1:{self.port}"
            self.server.start()
        except BaseException:
            self.stop()
            raise

    def connect(self, name: str, address: str) -> None:
        channel = grpc.secure_channel(address, self._client_creds)
        self._channels.append(channel)
        self.upstream[name] = rpc.client_stub(channel)

    def ResolveTicket(self, request: Any, context: Any) -> Any:
        md = dict(context.invocation_metadata())
        self.calls.append(md)
        mode = self.mode
        if mode == "slow":
            self.release.wait(10)
            context.abort(grpc.StatusCode.UNAVAILABLE, "too late")
        if mode == "stale":
            assert self.last_answer is not None
            return rpc.MikeyMessage(data=self.last_answer)
        target = "B" if mode == "loop" else "C"
        hops = str(int(md.get("mikey-hops", "0")) + 1) if mode == "loop" else md["mikey-hops"]
        forward = (("x-correlation-id", md["x-correlation-id"]), ("mikey-hops", hops))
        try:
            answer = self.upstream[target].ResolveTicket(request, metadata=forward, timeout=5)
        except grpc.RpcError as exc:
            err: Any = exc
            context.set_trailing_metadata(tuple(err.trailing_metadata() or ()))
            context.abort(err.code(), err.details())
        data = bytes(answer.data)
        if mode == "forge":
            forged = bytearray(data)
            forged[-1] ^= 0x01  # the last byte of V's MAC
            return rpc.MikeyMessage(data=bytes(forged))
        self.last_answer = data
        return rpc.MikeyMessage(data=data)

    def RequestTicket(self, request: Any, context: Any) -> Any:  # pragma: no cover
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "relay")

    def stop(self) -> None:
        """Stop serving, close the channels to B and C, end the worker threads (also after a
        half-done setup; idempotent)."""
        self.release.set()
        self.server.stop(None).wait(5)
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Domain:
    name: str
    kms_id: str
    home: Path
    port: int
    cert: CertFiles
    serve: ServeProcess | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def kms_id_bytes(self) -> bytes:
        return self.kms_id.encode()

    def audit(self, correlation_id: str | None = None) -> list[dict[str, Any]]:
        path = self.home / "audit.log"
        records = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        if correlation_id is None:
            return records
        return [r for r in records if r.get("correlation_id") == correlation_id]

    def start(self) -> None:
        self.serve = ServeProcess(self.home, self.port)
        try:
            self.serve.wait_ready(60)
        except BaseException:
            self.serve.kill()
            raise

    def stop(self) -> None:
        if self.serve is not None and self.serve.proc.poll() is None:
            rc = self.serve.terminate()
            assert rc == 0, self.serve.stderr

    def kill(self) -> None:
        if self.serve is not None:
            self.serve.kill()


@dataclass
class Fed:
    domains: dict[str, Domain]
    ca: TestCa
    endpoint_cert: CertFiles
    relay: Relay
    ks: SoftwareKeyStore = field(default_factory=SoftwareKeyStore)
    _clients: list[KmsClient] = field(default_factory=list)

    def __getitem__(self, name: str) -> Domain:
        return self.domains[name]

    def client(self, name: str, timeout: float = 10.0) -> KmsClient:
        c = KmsClient(
            self.domains[name].target,
            root_certificates=self.ca.path,
            certificate_chain=self.endpoint_cert.cert,
            private_key=self.endpoint_cert.key,
            timeout=timeout,
        )
        self._clients.append(c)
        return c

    def initiator(self, who: bytes, domain: str) -> Initiator:
        creds = Credentials(who, PSKS[who], self.domains[domain].kms_id_bytes, IdType.URI)
        return Initiator(creds, self.ks)

    def responder(self, who: bytes, domain: str, psk: bytes | None = None) -> Responder:
        creds = Credentials(
            who, PSKS[who] if psk is None else psk, self.domains[domain].kms_id_bytes, IdType.URI
        )
        return Responder(creds, self.ks)

    def close(self) -> None:
        with contextlib.ExitStack() as stack:  # every client, even if one close fails
            for c in self._clients:
                stack.callback(c.close)
            self._clients.clear()


def _enable_mtls(home: Path, cert: CertFiles, ca: Path) -> None:
    """[server] tls_cert / tls_key / tls_client_ca in kms.toml (the template has them
    commented out). [federation] keeps its defaults: the server certificate is also the
    client certificate for calls to peers, over mutual TLS."""
    path = home / "kms.toml"
    text = path.read_text()
    head, sep, rest = text.partition("\n[policy]")  # only [server]'s keys, not [metrics]'
    for key, value in (("tls_cert", cert.cert), ("tls_key", cert.key), ("tls_client_ca", ca)):
        head, n = re.subn(rf"^# {key} = .*$", f'{key} = "{value}"', head, flags=re.MULTILINE)
        assert n == 1, key
    text = head + sep + rest
    path.write_text(text)


def _provision(d: Domain, ca: TestCa, users: dict[bytes, bytes], peers: list[list[str]]) -> None:
    run_kms(d.home, "init", "--kms-id", d.kms_id)
    for who, psk in users.items():
        run_kms(d.home, "endpoint", "add", who.decode(), "--psk-hex", psk.hex())
    for args in peers:
        run_kms(d.home, "peer", "add", *args, "--ca", str(ca.path))
    _enable_mtls(d.home, d.cert, ca.path)


@contextlib.contextmanager
def federation(root: Path) -> Iterator[Fed]:
    """The three domains and the relay, provisioned and started; everything started is
    stopped again on the way out, also when the setup fails half-way (a gRPC server or
    channel left open keeps polling a completion queue whose file descriptors are gone)."""
    with contextlib.ExitStack() as stack:
        ca = TestCa(root / "pki")
        relay = Relay(ca, ca.issue("relay"))
        stack.callback(relay.stop)
        domains = {
            name: Domain(name, kms_id, root / name, free_port(), ca.issue(f"kms-{name.lower()}"))
            for name, kms_id in (("A", A_ID), ("B", B_ID), ("C", C_ID))
        }
        for d in domains.values():
            stack.callback(d.kill)
        a, b, c = domains["A"], domains["B"], domains["C"]
        plans = [
            (a, {ALICE: PSKS[ALICE]},
             [[B_ID, "--address", b.target, "--psk-hex", AB_KEY.hex(),
               "--resolve-for", "sip:*@b.example"]]),
            (b, {BOB: PSKS[BOB], BOB2: PSKS[BOB2], BOB3: PSKS[BOB3], CAROL: CAROL_AT_B_PSK},
             [[A_ID, "--address", a.target, "--psk-hex", AB_KEY.hex(),
               "--resolve-for", "sip:*@a.example", "--deadline-ms", str(DEADLINE_B_TO_A_MS)],
              [C_ID, "--address", relay.address, "--psk-hex", BC_KEY.hex(),
               "--deadline-ms", str(DEADLINE_B_TO_C_MS)]]),
            (c, {CAROL: PSKS[CAROL]},
             [[B_ID, "--address", b.target, "--psk-hex", BC_KEY.hex(),
               "--resolve-for", "sip:*@b.example", "--rate", str(C_RATE_FOR_B)]]),
        ]  # fmt: skip
        # The three homes are independent: provision them side by side (init makes RSA keys).
        with futures.ThreadPoolExecutor(3) as pool:
            for f in [pool.submit(_provision, d, ca, users, peers) for d, users, peers in plans]:
                f.result()
        endpoint_cert = ca.issue("endpoints")
        fed = Fed(domains, ca, endpoint_cert, relay)
        stack.callback(fed.close)
        with futures.ThreadPoolExecutor(3) as pool:
            for f in [pool.submit(d.start) for d in domains.values()]:
                f.result()
        relay.connect("B", b.target)
        relay.connect("C", c.target)
        yield fed


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    assert shutil.which("softhsm2-util"), "softhsm2-util is required (scripts/setup.sh)"
    with federation(tmp_path_factory.mktemp("federation")) as f:
        yield f


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())
