"""How many KMS core calls one worker process computes at once.

Every exchange makes about ten PKCS#11 calls, and each releases and re-takes the GIL. With a
token that computes inside this process (SoftHSM), several threads in the core at once hand
the GIL back and forth (a convoy) and every call gets slower: Ticket Request PSK with 8
clients on one worker, 272/s and 3.6 ms handler CPU per call with 32 threads in the core,
403/s and 1.8 ms with one (docs/performance.md). A hardware or network HSM waits on the
device instead, and there parallel calls help. Parallelism for a software token comes from
worker processes.

A call that waits on the network gives its slot up while it waits (``released``): the
federated resolve, whose core steps return before the peer is asked
(:mod:`kms.server.federated`), and database waits in cluster mode.

Where the calls run (:func:`core_threads_for`, ``[server] core_calls``): with one slot and
SQLite stores, inline on the server's event loop (the loop itself is the one slot: no
semaphore, no thread); with several slots, or PostgreSQL stores (cluster mode: a call waits
on the database several times, and the loop must go on meanwhile), in a thread per admitted
call, the threads sharing the slots.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from kms.server.config import KmsConfig
from kms.server.settings import CoreCalls, StoreBackend

ENV = "KMS_CORE_CONCURRENCY"  # overrides [server] core_concurrency (benchmarks)
CALLS_ENV = "KMS_CORE_CALLS"  # overrides [server] core_calls (benchmarks)
SOFTWARE_TOKEN_SLOTS = 1
HARDWARE_TOKEN_SLOTS = 8


def core_slots_for(config: KmsConfig) -> int:
    """``KMS_CORE_CONCURRENCY``, else ``[server] core_concurrency``, else (0 = auto) 1 for a
    SoftHSM module and 8 for any other."""
    env = os.environ.get(ENV)
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"{ENV} must be an integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"{ENV} must be >= 1, got {n}")
        return n
    if config.server.core_concurrency:
        return config.server.core_concurrency
    module = os.path.basename(str(config.token.module)).lower()
    return SOFTWARE_TOKEN_SLOTS if "softhsm" in module else HARDWARE_TOKEN_SLOTS


def core_threads_for(config: KmsConfig, slots: int, calls: int) -> int:
    """0: the core runs inline on the event loop; else the number of threads it runs in
    (``calls``, the calls a worker admits: each can wait for a slot or the database)."""
    env = os.environ.get(CALLS_ENV)
    try:
        mode = CoreCalls(env) if env else CoreCalls(config.server.core_calls)
    except ValueError:
        raise ValueError(f"{CALLS_ENV} must be one of auto, inline, threads, got {env!r}"
                         ) from None
    if mode is CoreCalls.AUTO:
        cluster = config.store.backend == StoreBackend.POSTGRESQL
        mode = CoreCalls.INLINE if slots == 1 and not cluster else CoreCalls.THREADS
    return 0 if mode is CoreCalls.INLINE else max(calls, slots)


class CoreSlots:
    """A semaphore of core slots that remembers, per thread, whether the thread holds one.

    A plain lock for one slot (acquired and released in C) was measured no cheaper than the
    semaphore: Ticket Request PSK, 8 clients, 6 alternating rounds, 3.23 ms CPU per call
    with the semaphore, 2.93 ms with a lock, single rounds spreading 2.4-4.1 ms. ``held()``
    is a reusable context manager object rather than a generator: it is on every call's
    path."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("at least one core slot")
        self.size = n
        self._sem = threading.BoundedSemaphore(n)
        self._local = threading.local()
        self._held = _Held(self)

    def held(self) -> AbstractContextManager[None]:
        return self._held

    def _enter(self) -> None:
        self._sem.acquire()
        self._local.held = True

    def _exit(self) -> None:
        self._local.held = False
        self._sem.release()

    @contextmanager
    def released(self) -> Iterator[None]:
        """Give this thread's slot up for the block (no-op if it holds none)."""
        if not getattr(self._local, "held", False):
            yield
            return
        self._exit()
        try:
            yield
        finally:
            self._enter()


class _Held:
    """``with slots.held():`` (no state of its own: the holder is per thread)."""

    __slots__ = ("_slots",)

    def __init__(self, slots: CoreSlots) -> None:
        self._slots = slots

    def __enter__(self) -> None:
        self._slots._enter()

    def __exit__(self, *_exc: object) -> None:
        self._slots._exit()


__all__ = ["CALLS_ENV", "ENV", "CoreSlots", "core_slots_for", "core_threads_for"]
