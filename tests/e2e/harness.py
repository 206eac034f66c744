"""End-to-end harness: a KMS home made with the operator CLI (`kms init`, `kms endpoint add`,
`kms group add`), `kms serve` as a subprocess on 127.0.0.1:<free port>, gRPC clients and
endpoints (the software key store), and real SRTP with pylibsrtp."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pylibsrtp

from hsm.software import SoftwareKeyStore
from kms.endpoint.client import KmsClient, obtain_ticket
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator, TicketGrant
from kms.endpoint.responder import Responder
from kms.endpoint.session import AES_CM_128_HMAC_SHA1_32, SrtpKeys
from kms.mikey.constants import IdType

REPO = Path(__file__).resolve().parents[2]
READY_RE = re.compile(r"^kms: serving on (\S+) \((\d+) workers?\)$", re.MULTILINE)

KMS_ID = b"kms:e2e.example.org"
ALICE = b"sip:alice@example.org"
BOB = b"sip:bob@example.org"
CAROL = b"sip:carol@example.org"
MALLORY = b"sip:mallory@example.org"
ERIN = b"sip:erin@example.org"
FRANK = b"sip:frank@example.org"
GRACE = b"sip:grace@example.org"
TEAM = b"sip:team@example.org"
PSKS: dict[bytes, bytes] = {
    ALICE: bytes.fromhex("a1" * 16),
    BOB: bytes.fromhex("b0b0" * 8),
    CAROL: bytes.fromhex("ca" * 20),
    MALLORY: bytes.fromhex("3a" * 32),
    ERIN: bytes.fromhex("e1" * 16),
    FRANK: bytes.fromhex("f7" * 24),
    GRACE: bytes.fromhex("67" * 16),
}
GROUPS: dict[bytes, tuple[bytes, ...]] = {TEAM: (BOB, CAROL)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_kms(
    home: Path, *args: str, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "kms.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kms {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def set_policy(home: Path, **values: object) -> None:
    """Edit ``[policy]`` keys of kms.toml (before `kms serve` reads it)."""
    path = home / "kms.toml"
    text = path.read_text()
    for key, value in values.items():
        rendered = ("true" if value else "false") if isinstance(value, bool) else str(value)
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {rendered}", text, flags=re.MULTILINE)
        assert n == 1, f"{key} not in kms.toml"
    path.write_text(text)


def make_home(
    path: Path,
    endpoints: Mapping[bytes, bytes] = PSKS,
    groups: Mapping[bytes, Sequence[bytes]] = GROUPS,
) -> Path:
    """A home initialised and provisioned with the operator CLI, as an operator would."""
    run_kms(path, "init", "--kms-id", KMS_ID.decode())
    for ident, psk in endpoints.items():
        run_kms(path, "endpoint", "add", ident.decode(), "--psk-hex", psk.hex())
    for group, members in groups.items():
        run_kms(path, "group", "add", group.decode(), *(m.decode() for m in members))
    return path


class ServeProcess:
    """`kms serve` in a subprocess; output goes to files so that a full pipe never blocks."""

    def __init__(self, home: Path, port: int, *args: str) -> None:
        self.home = home
        self.port = port
        self.target = f"127.0.0.1:{port}"
        stamp = time.monotonic_ns()
        self.out_path = home.parent / f"serve-{stamp}.out"
        self.err_path = home.parent / f"serve-{stamp}.err"
        self._out = self.out_path.open("wb")
        self._err = self.err_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kms.cli", "--home", str(home), "serve",
                 "--listen", self.target, *args],
                stdout=self._out,
                stderr=self._err,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        except BaseException:
            self._close()
            raise

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_RE.search(self.stdout):
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"kms serve exited {self.proc.returncode}:\n{self.stdout}\n{self.stderr}"
                )
            time.sleep(0.05)
        raise AssertionError(f"kms serve not ready:\n{self.stdout}\n{self.stderr}")

    def terminate(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        self._out.close()
        self._err.close()


@dataclass
class Kms:
    """A running KMS and what a test needs to talk to it."""

    home: Path
    serve: ServeProcess
    ks: SoftwareKeyStore = field(default_factory=SoftwareKeyStore)
    _clients: list[KmsClient] = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.serve.target

    def client(self, timeout: float = 10.0) -> KmsClient:
        c = KmsClient(self.target, timeout=timeout)
        self._clients.append(c)
        return c

    def creds(self, who: bytes, psk: bytes | None = None) -> Credentials:
        return Credentials(who, PSKS[who] if psk is None else psk, KMS_ID, IdType.URI)

    def initiator(self, who: bytes = ALICE) -> Initiator:
        return Initiator(self.creds(who), self.ks)

    def responder(self, who: bytes = BOB, psk: bytes | None = None) -> Responder:
        return Responder(self.creds(who, psk), self.ks)

    def grant(self, desired: DesiredPolicy, who: bytes = ALICE) -> TicketGrant:
        return obtain_ticket(self.client(), self.initiator(who), desired)

    def close_clients(self) -> None:
        with contextlib.ExitStack() as stack:  # every channel, even if one close fails
            for c in self._clients:
                stack.callback(c.close)
            self._clients.clear()


def start_serve(home: Path, *args: str) -> ServeProcess:
    p = ServeProcess(home, free_port(), *args)
    try:
        p.wait_ready()
    except BaseException:
        p.kill()
        raise
    return p


@contextlib.contextmanager
def running_kms(home: Path, *args: str) -> Iterator[Kms]:
    serve = start_serve(home, *args)
    kms = Kms(home, serve)
    with contextlib.ExitStack() as stack:  # LIFO: clients closed, then the server stopped
        stack.callback(serve.kill)  # whatever happens in between (a no-op once it exited)
        stack.callback(_clean_stop, serve)
        stack.callback(kms.close_clients)
        yield kms


def _clean_stop(serve: ServeProcess) -> None:
    if serve.proc.poll() is None:
        rc = serve.terminate()
        assert rc == 0, serve.stderr


# ------------------------------------------------------------------------------------------
# SRTP with libsrtp


def _profile(keys: SrtpKeys) -> int:
    if keys.profile == AES_CM_128_HMAC_SHA1_32:
        return int(pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32)
    assert keys.profile.encr_key_len == 16 and keys.profile.auth_tag_len == 10, keys.profile
    return int(pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80)


def srtp_session(keys: SrtpKeys, *, outbound: bool, key: bytes | None = None) -> pylibsrtp.Session:
    policy = pylibsrtp.Policy(
        key=keys.key_and_salt if key is None else key,
        ssrc_type=(
            pylibsrtp.Policy.SSRC_ANY_OUTBOUND if outbound else pylibsrtp.Policy.SSRC_ANY_INBOUND
        ),
        srtp_profile=_profile(keys),
    )  # fmt: skip
    return pylibsrtp.Session(policy=policy)


def rtp_packet(ssrc: int, seq: int, payload: bytes, pt: int = 96) -> bytes:
    """RTP header (RFC 3550 5.1): V=2, P=0, X=0, CC=0, M=0, PT, sequence, timestamp, SSRC."""
    return struct.pack("!BBHII", 0x80, pt & 0x7F, seq & 0xFFFF, 160 * seq, ssrc) + payload


def check_srtp(sender: SrtpKeys, receiver: SrtpKeys, count: int = 4) -> list[bytes]:
    """The sender protects ``count`` RTP packets of its crypto session; the receiver
    unprotects each one to the original packet. Returns the SRTP packets."""
    assert sender.ssrc == receiver.ssrc
    tx = srtp_session(sender, outbound=True)
    rx = srtp_session(receiver, outbound=False)
    out = []
    for seq in range(1, count + 1):
        payload = f"packet {seq} of cs {sender.cs_id}".encode() * 4
        plain = rtp_packet(sender.ssrc, seq, payload)
        protected = tx.protect(plain)
        assert protected != plain and len(protected) == len(plain) + sender.profile.auth_tag_len
        assert payload not in protected  # encrypted
        assert rx.unprotect(protected) == plain
        out.append(protected)
    return out


def srtp_refuses(packets: Sequence[bytes], keys: SrtpKeys, key: bytes | None = None) -> bool:
    """True if a receiver keyed with ``key`` (default: ``keys``) rejects every packet."""
    rx = srtp_session(keys, outbound=False, key=key)
    for p in packets:
        try:
            rx.unprotect(p)
        except pylibsrtp.Error:
            continue
        return False
    return True
