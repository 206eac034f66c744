"""``kms serve``: the process model around :class:`kms.server.grpc_server.KmsServer` (an
asyncio gRPC server whose loop runs on a thread of its own, while the main thread waits for
a signal).

* workers = 1: one process serves (no parent, no fork).
* workers = N > 1: a supervisor process starts N workers with multiprocessing's ``spawn``
  (fork + exec of a fresh interpreter). Each worker opens the home itself, opens the token
  and logs in, builds its own handler and listens on the same port with SO_REUSEPORT; the
  kernel spreads connections over them. PKCS#11 is never initialised in the supervisor after
  it starts workers (login state is per process and a forked PKCS#11 library is unusable),
  and ``spawn`` means no worker inherits a half-initialised library even when the supervisor
  initialised the home itself. The supervisor restarts a worker that dies (exponential
  backoff, reset after a minute of uptime), forwards SIGTERM/SIGINT, waits for the workers
  and exits 0. Workers also stop by themselves when the supervisor disappears.

Shutdown (SIGTERM or SIGINT): health goes NOT_SERVING, new calls are refused, in-flight
calls get ``grace`` seconds to finish, then the process exits 0.

A folder without kms.toml is initialised first (embedded SoftHSM2 token, TPK, RSA keys), so
that ``kms serve`` works on a fresh machine; the KMS id defaults to ``kms:<hostname>``.

One ``kms serve`` per home at a time: the supervisor (or the single process) holds an
exclusive lock on ``<home>/serve.lock``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import gc
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from kms.home import HomeError, init_home, open_home
from kms.keystore import KeyStoreError
from kms.server.admission import limits_for
from kms.server.compose import build_handler
from kms.server.config import (
    CONFIG_FILE,
    ConfigError,
    KmsConfig,
    check_metrics_listen,
    is_loopback,
    load_config,
    split_listen,
)
from kms.server.federation import FederationConfigError, GrpcPeerResolver
from kms.server.grpc_server import (
    DEFAULT_THREADS,
    KmsServer,
    ServerError,
    tls_credentials,
    tls_watch,
)
from kms.server.metrics_http import MetricsListen
from kms.server.metrics_token import TOKEN_PROBE_S, PlainProbe, ServingProbe, TokenProbe
from kms.server.observe import ObservedProcess, supervise_with_metrics
from kms.server.slots import CoreSlots, core_slots_for, core_threads_for
from kms.server.tls_files import DEFAULT_RECHECK_S, TlsWatch
from kms.store.registry import RegistryError

log = logging.getLogger("kms.server.serve")

LOCK_FILE = "serve.lock"
DEFAULT_GRACE_S = 10.0
STARTUP_TIMEOUT_S = 120.0  # token login + handler construction, per worker
RESTART_BACKOFF_MAX_S = 30.0
RESTART_RESET_AFTER_S = 60.0  # a worker that lived this long was healthy: reset its backoff
PARENT_CHECK_S = 1.0


class ServeError(Exception):
    """``kms serve`` cannot start; one line for the operator."""


# What an operator can cause and fix (printed as one line, no traceback).
EXPECTED_ERRORS = (
    ServeError, ServerError, HomeError, ConfigError, RegistryError, KeyStoreError, OSError,
    FederationConfigError,
)


def default_kms_id() -> str:
    """``kms:<hostname>``: a URI (what kms.toml requires) that names this machine. Only used
    when ``serve`` initialises an empty home; the id is then fixed in kms.toml."""
    host = re.sub(r"[^A-Za-z0-9.\-]", "", socket.gethostname()).strip(".-").lower()
    return f"kms:{host or 'localhost'}"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs to serve (picklable: it crosses the spawn boundary)."""

    home: Path
    listen: str
    workers: int
    threads: int = DEFAULT_THREADS
    grace: float = DEFAULT_GRACE_S
    tls: TlsFiles | None = None
    log_level: str = "INFO"
    metrics: MetricsListen | None = None  # the /metrics listener, None: off
    tls_recheck_s: float = DEFAULT_RECHECK_S  # TLS files: at most one stat per this many s

    def tls_watch(self) -> TlsWatch | None:
        """The server's TLS files, validated now (ServerError if they cannot be served);
        each process makes its own and follows renewals on its own."""
        if self.tls is None:
            return None
        return tls_watch(self.tls.cert, self.tls.key, self.tls.client_ca,
                         recheck_s=self.tls_recheck_s)

    @property
    def mode(self) -> str:
        if self.tls is None:
            return "plaintext"
        return "mutual TLS" if self.tls.client_ca is not None else "TLS"


# ------------------------------------------------------------------------------------------
# logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={"fields": {...}}`` adds structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                entry.setdefault(str(k), v)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())


# ------------------------------------------------------------------------------------------
# planning (parent): everything that can be refused is refused before a worker starts


def make_plan(
    home: Path,
    *,
    listen: str | None,
    workers: int | None,
    threads: int,
    grace: float,
    log_level: str,
    metrics_listen: str | None = None,
) -> Plan:
    """Merge the command line over kms.toml ``[server]`` and validate the result."""
    config = load_config(home)
    server = config.server
    listen = listen or server.listen
    try:
        host, _port = split_listen(listen)
    except ValueError as exc:
        raise ServeError(f"--listen {listen}: {exc}") from None
    tls = (
        None
        if server.tls_cert is None or server.tls_key is None
        else TlsFiles(server.tls_cert, server.tls_key, server.tls_client_ca)
    )
    if tls is None and not is_loopback(host) and not server.allow_plaintext_non_loopback:
        # kms.toml's own listen is checked when the config loads; --listen is checked here.
        raise ServeError(
            f"refusing plaintext gRPC on non-loopback address {listen}: set tls_cert and "
            f"tls_key in [server] of {home / CONFIG_FILE} (or allow_plaintext_non_loopback "
            "= true)"
        )
    plan = Plan(
        home=home,
        listen=listen,
        workers=workers or server.workers,
        threads=threads,
        grace=grace,
        tls=tls,
        log_level=log_level,
        metrics=metrics_plan(config, metrics_listen),
    )
    plan.tls_watch()  # unusable TLS files: fail now, in one place, not in N workers
    return plan


def metrics_plan(config: KmsConfig, listen: str | None) -> MetricsListen | None:
    """``--metrics-listen`` over ``[metrics] listen``; None when neither is set."""
    m = config.metrics
    listen = listen or m.listen
    if listen is None:
        return None
    try:
        check_metrics_listen(listen, m.tls_cert is not None, m.allow_plaintext_non_loopback)
    except ValueError as exc:
        raise ServeError(f"--metrics-listen: {exc}") from None
    return MetricsListen(listen, m.tls_cert, m.tls_key)


def init_empty_home(home: Path, kms_id: str, say: Callable[[str], None]) -> None:
    """Initialise ``home`` with an embedded SoftHSM2 token (what ``kms init`` does)."""
    say(f"{home} has no {CONFIG_FILE}: initialising a KMS home for {kms_id}")
    h = init_home(home, kms_id, progress=say)
    try:
        tpk = h.registry.tpk_current()
        say(
            f"initialised {h.path}: embedded SoftHSM2 token {h.config.token.label!r} "
            f"(PINs in {h.path / 'token'}), TPK version {tpk.version if tpk else '?'}, "
            f"certificate {h.path / 'kms-cert.pem'}"
        )
    finally:
        h.close()  # the token is opened again by whoever serves (after any fork)


@contextlib.contextmanager
def serve_lock(home: Path) -> Iterator[None]:
    """One ``kms serve`` per home: two would share the port and the replay state."""
    path = home / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ServeError(
                f"another `kms serve` (pid {other}) is running on {home}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_port_free(listen: str) -> None:
    """Probe the port exclusively (SO_REUSEADDR only skips TIME_WAIT). With SO_REUSEPORT the
    workers would otherwise silently share the port with any other server of the same
    user."""
    host, port = split_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ServeError(f"cannot resolve {listen}: {exc.strerror}") from None
    for family, kind, proto, _name, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                raise ServeError(f"cannot listen on {listen}: {exc.strerror}") from None


# ------------------------------------------------------------------------------------------
# one serving process


def serve_once(
    plan: Plan,
    *,
    ready: Callable[[KmsServer], None],
    parent_pid: int | None = None,
) -> bool:
    """Open the home, build the handler, serve until SIGTERM/SIGINT (or the parent dies),
    drain. Returns whether the drain finished every call within the grace period."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
        stop.set()

    # Before the slow part, so that a SIGTERM during startup is a clean stop, not a kill.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    home = open_home(plan.home)
    handler: Any = None
    peers: GrpcPeerResolver | None = None
    observed: ObservedProcess | None = None
    probe: TokenProbe | None = None
    try:
        if plan.metrics is not None or home.config.tracing.enabled:
            observed = ObservedProcess(plan.metrics, plan.workers, home)
        n_slots = core_slots_for(home.config)
        slots = CoreSlots(n_slots) if observed is None else observed.slots(n_slots)
        # RFC 6043 9: tickets issued by a peer KMS are resolved by asking it (per process),
        # without holding a core slot while the peer answers.
        peers = GrpcPeerResolver.from_config(home.config, home.stores.open_registry)
        if observed is not None and peers.client_watch is not None:
            observed.watch_tls(peers.client_watch)  # kms_tls_*{listener="federation_client"}
        home.stores.start_background()  # cluster mode: registry change watch, pruning
        if observed is None:
            handler = build_handler(home, peers=peers, workers=plan.workers, slots=slots)
        else:
            handler = observed.build_handler(
                observed.peers(peers), workers=plan.workers, slots=slots
            )
        home.stores.set_wait_hook(slots.released)  # database waits hold no core slot
        core_threads = core_threads_for(home.config, n_slots, plan.threads)
        watch = plan.tls_watch()
        if watch is not None and observed is not None:
            observed.watch_tls(watch)  # kms_tls_* metrics of this process
        server = KmsServer(
            handler,
            plan.listen,
            credentials=None if watch is None else tls_credentials(watch),
            threads=plan.threads,
            reuse_port=plan.workers > 1,
            slots=slots,
            limits=limits_for(home.config.server, plan.threads),
            core_threads=core_threads,
        )
        if observed is not None:
            observed.watch_server(server)  # the guard's counts on /metrics
        server.start()
        # Readiness follows the token and the shared state (and kms_token_up, with
        # metrics): one probe thread.
        token = (observed.probed if observed is not None else None) or PlainProbe(
            home.keystore())
        probe = TokenProbe(ServingProbe(token, home.stores), TOKEN_PROBE_S,
                           on_change=server.set_ready)
        probe.start()
        log.info(
            "serving",
            extra={"fields": {"listen": plan.listen, "port": server.port, "tls": plan.mode,
                              "core_slots": slots.size,
                              "core_calls": "threads" if core_threads else "inline"}},
        )
        freeze_startup_objects()
        ready(server)
        while not stop.wait(PARENT_CHECK_S):
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("supervisor gone; stopping")
                break
        t0 = time.monotonic()
        clean = server.drain(plan.grace)
        log.info(
            "stopped",
            extra={"fields": {"clean": clean, "drain_s": round(time.monotonic() - t0, 3)}},
        )
        return clean
    finally:
        if probe is not None:
            probe.stop()
        close = getattr(handler, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()
        if peers is not None:
            peers.close()
        if observed is not None:
            observed.close()
        home.close()


def freeze_startup_objects() -> None:
    """Move what start-up made (modules, the handler, sessions, caches: ~50,000 objects,
    alive as long as the process) out of the garbage collector's sight (``gc.freeze``).

    A full collection scans every tracked object. It comes every few thousand calls, runs
    on whichever thread allocates at that moment, the event loop mostly, and took 18-23 ms
    in a serving worker (measured with ``gc.callbacks``): a stall every call queued behind
    it waits for. Frozen, a full collection scans only what calls have made since.
    Start-up's own garbage is collected first, so that nothing freed is kept."""
    gc.collect()
    gc.freeze()


def one_line(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip()
    return text or type(exc).__name__


def _worker_main(plan: Plan, conn: Connection, parent_pid: int) -> None:
    """Entry point of a spawned worker (a fresh interpreter: the token is opened here)."""
    configure_logging(plan.log_level)
    try:
        serve_once(plan, ready=lambda _s: conn.send(("ready", "")), parent_pid=parent_pid)
    except Exception as exc:
        # Expected startup failures are one line for the supervisor to print; anything
        # else is a bug and gets its traceback logged here too.
        if not isinstance(exc, EXPECTED_ERRORS):
            log.exception("worker failed")
        with contextlib.suppress(OSError):
            conn.send(("error", one_line(exc)))
        sys.exit(1)


# ------------------------------------------------------------------------------------------
# supervisor


@dataclass
class _Worker:
    slot: int
    process: Any  # multiprocessing.context.SpawnProcess
    conn: Connection
    started: float
    ready: bool = False


class Supervisor:
    """Starts ``plan.workers`` workers, restarts crashed ones, stops them on a signal."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: dict[int, _Worker] = {}
        self.failures: dict[int, int] = {}
        self.restart_at: dict[int, float] = {}
        self.stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        # Called with the pid of each worker that exited (drops its live metric gauges).
        self.on_worker_exit: Callable[[int], None] | None = None

    def _spawn(self, slot: int) -> _Worker:
        parent_conn, child_conn = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(
            target=_worker_main,
            args=(self.plan, child_conn, os.getpid()),
            name=f"kms-worker-{slot}",
            daemon=False,  # workers drain on their own; the supervisor waits for them
        )
        p.start()
        child_conn.close()
        w = _Worker(slot, p, parent_conn, time.monotonic())
        self.workers[slot] = w
        log.info("worker started", extra={"fields": {"slot": slot, "worker_pid": p.pid}})
        return w

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")  # wake the wait() below

    def run(self, announce: Callable[[], None]) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            for slot in range(self.plan.workers):
                self._spawn(slot)
            self._await_startup()
            if not self.stop.is_set():
                announce()
                self._supervise()
        finally:
            self._stop_all()
            os.close(self._wake_r)
            os.close(self._wake_w)
        return 0

    def _messages(self, w: _Worker) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        with contextlib.suppress(EOFError, OSError):
            while w.conn.poll():
                out.append(w.conn.recv())
        return out

    def _await_startup(self) -> None:
        """All workers ready, or a ServeError with the first worker's reason."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.stop.is_set():
            pending = [w for w in self.workers.values() if not w.ready]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise ServeError(f"workers not ready after {STARTUP_TIMEOUT_S:.0f} s")
            objs: list[Any] = [self._wake_r]
            for w in pending:
                objs += [w.conn, w.process.sentinel]
            multiprocessing.connection.wait(objs, timeout=1.0)
            for w in pending:
                for kind, text in self._messages(w):
                    if kind == "ready":
                        w.ready = True
                    elif kind == "error":
                        raise ServeError(text)
                if not w.ready and not w.process.is_alive():
                    raise ServeError(
                        f"worker {w.slot} exited with status {w.process.exitcode} during startup"
                    )

    def _supervise(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            for slot, when in sorted(self.restart_at.items()):
                if when <= now:
                    del self.restart_at[slot]
                    self._spawn(slot)
            objs: list[Any] = [self._wake_r]
            for w in self.workers.values():
                objs += [w.conn, w.process.sentinel]
            timeout = min((t - now for t in self.restart_at.values()), default=5.0)
            multiprocessing.connection.wait(objs, timeout=max(timeout, 0.05))
            for w in list(self.workers.values()):
                for kind, text in self._messages(w):
                    if kind == "ready":
                        w.ready = True
                        log.info("worker ready", extra={"fields": {"slot": w.slot}})
                    elif kind == "error":
                        log.error("worker failed", extra={"fields": {"slot": w.slot,
                                                                      "error": text}})
                if not w.process.is_alive() and not self.stop.is_set():
                    self._schedule_restart(w)

    def _schedule_restart(self, w: _Worker) -> None:
        w.process.join(0)
        if self.on_worker_exit is not None:
            self.on_worker_exit(w.process.pid)
        w.conn.close()
        del self.workers[w.slot]
        lived = time.monotonic() - w.started
        if lived >= RESTART_RESET_AFTER_S:
            self.failures[w.slot] = 0
        n = self.failures.get(w.slot, 0)
        self.failures[w.slot] = n + 1
        delay = min(2.0**n, RESTART_BACKOFF_MAX_S) if n else 0.5
        self.restart_at[w.slot] = time.monotonic() + delay
        log.warning(
            "worker died; restarting",
            extra={
                "fields": {
                    "slot": w.slot,
                    "worker_pid": w.process.pid,
                    "exitcode": w.process.exitcode,
                    "restart_in_s": delay,
                }
            },
        )

    def _stop_all(self) -> None:
        alive = [w for w in self.workers.values() if w.process.is_alive()]
        for w in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.process.pid, signal.SIGTERM)
        # Workers drain within the grace period; allow for their exit on top of it.
        deadline = time.monotonic() + self.plan.grace + 5.0
        for w in alive:
            w.process.join(max(deadline - time.monotonic(), 0.0))
            if w.process.is_alive():
                log.error("worker did not stop; killing", extra={"fields": {"slot": w.slot}})
                w.process.kill()
                w.process.join(5)
        for w in self.workers.values():
            w.conn.close()


# ------------------------------------------------------------------------------------------
# entry point


def serve(
    home: Path,
    *,
    listen: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    grace: float = DEFAULT_GRACE_S,
    log_level: str = "INFO",
    kms_id: str | None = None,
    metrics_listen: str | None = None,
    out: Callable[[str], None] = print,
    say: Callable[[str], None] = print,
) -> int:
    """``kms serve``: returns the exit status (0 after a signal-initiated shutdown).

    ``out`` gets the ready line, ``say`` what an automatic initialisation did.
    """
    configure_logging(log_level)
    home = home.absolute()
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ServeError(f"cannot create {home}: {exc.strerror}") from None
    with serve_lock(home):
        if not (home / CONFIG_FILE).exists():
            init_empty_home(home, kms_id or default_kms_id(), say)
        elif kms_id is not None and load_config(home).kms_id != kms_id:
            raise ServeError(
                f"--kms-id {kms_id} differs from the id of the initialised home "
                f"({load_config(home).kms_id}); it only applies to an empty home"
            )
        plan = make_plan(
            home, listen=listen, workers=workers, threads=threads or DEFAULT_THREADS,
            grace=grace,
            log_level=log_level,
            metrics_listen=metrics_listen,
        )
        n = plan.workers

        def announce(*_: Any) -> None:
            out(f"kms: serving on {plan.listen} ({n} worker{'s' if n != 1 else ''})")

        log.info(
            "starting",
            extra={"fields": {"home": str(home), "listen": plan.listen, "workers": n,
                              "threads": plan.threads, "tls": plan.mode}},
        )
        # Before the token is opened: a clear one-line error instead of gRPC's own log line.
        check_port_free(plan.listen)
        if n == 1:
            serve_once(plan, ready=announce)
            return 0
        sup = Supervisor(plan)
        if plan.metrics is not None:

            def run(on_worker_exit: Callable[[int], None]) -> int:
                sup.on_worker_exit = on_worker_exit
                return sup.run(announce)

            return supervise_with_metrics(plan.home, plan.metrics, n, run)
        return sup.run(announce)


__all__ = [
    "DEFAULT_GRACE_S",
    "Plan",
    "ServeError",
    "Supervisor",
    "configure_logging",
    "default_kms_id",
    "make_plan",
    "one_line",
    "serve",
    "serve_once",
]
