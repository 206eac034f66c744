"""The benchmark's servers: the real ``kms serve``, or the same stack with an echo handler.

    python -m bench.echo --home H --listen 127.0.0.1:P --workers N [--echo]

Both run :func:`kms.server.serve.serve` unchanged: the same supervisor and ``spawn``ed worker
processes sharing the port with SO_REUSEPORT, the same :class:`KmsServer` (the event-loop
server, ``maximum_concurrent_rpcs``, options, call guard, health and reflection; the handler
inline on the loop with one core slot), the same :class:`KmsServicer` (correlation id,
initial and trailing metadata, status mapping). With
``--echo`` (environment ``KMS_BENCH_ECHO=1``, so that spawned workers see it too when they
re-import this module as ``__mp_main__``) the composition root's ``build_handler`` is
replaced by :class:`EchoHandler`, which answers every call with the request bytes: the
floor of "a call through our server" with no MIKEY, no token and no state.

With ``KMS_BENCH_COUNTS=DIR`` every worker counts the calls its handler answers in
``DIR/<pid>`` (an 8-byte counter in a shared mapping that the driver reads at the start and
end of a timed window: calls per worker, to see how SO_REUSEPORT spread the load).

``KMS_BENCH_TREE=PATH`` serves the ``kms`` package of another source tree (e.g. a worktree
of the branch point) with the same interpreter: ``bench.run --compare`` uses it for its
before/after rounds.
"""

from __future__ import annotations

import argparse
import mmap
import os
import struct
import sys
import threading
from pathlib import Path
from typing import Any

TREE_ENV = "KMS_BENCH_TREE"
COUNTS_ENV = "KMS_BENCH_COUNTS"
sys.path.insert(0, os.environ.get(TREE_ENV) or str(Path(__file__).resolve().parent.parent))

import kms.server.serve as serve_mod  # noqa: E402
from kms.core.api import KmsReply, Outcome  # noqa: E402

ECHO_ENV = "KMS_BENCH_ECHO"


class EchoHandler:
    """:class:`kms.core.api.KmsHandler` that returns the request as the response."""

    def request_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> KmsReply:
        return KmsReply(Outcome.OK, wire)

    def resolve_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> KmsReply:
        return KmsReply(Outcome.OK, wire)


def _echo_handler(*_args: Any, **_kwargs: Any) -> Any:
    return EchoHandler()


class CountingHandler:
    """Counts the calls of the handler it wraps in ``DIR/<pid>`` (see the module doc)."""

    def __init__(self, inner: Any, folder: str) -> None:
        self._inner = inner
        path = os.path.join(folder, str(os.getpid()))
        with open(path, "wb") as f:
            f.write(b"\0" * 8)
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 8)
        self._n = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self._n += 1
            struct.pack_into("<Q", self._map, 0, self._n)

    def request_ticket(self, *args: Any, **kwargs: Any) -> Any:
        self._count()
        return self._inner.request_ticket(*args, **kwargs)

    def resolve_ticket(self, *args: Any, **kwargs: Any) -> Any:
        self._count()
        return self._inner.resolve_ticket(*args, **kwargs)

    def request_steps(self, *args: Any, **kwargs: Any) -> Any:
        """The event-loop server's Ticket Request as steps (kms.server.federated), counted."""
        self._count()
        steps = getattr(self._inner, "request_steps", None)
        if steps is None:
            return self._inner.request_ticket(*args, **kwargs)
        return (yield from steps(*args, **kwargs))

    def resolve_steps(self, *args: Any, **kwargs: Any) -> Any:
        """The event-loop server's resolve as steps (kms.server.federated), counted."""
        self._count()
        steps = getattr(self._inner, "resolve_steps", None)
        if steps is None:
            return self._inner.resolve_ticket(*args, **kwargs)
        return (yield from steps(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:  # close(), refuse_undecodable()
        return getattr(self._inner, name)


def _install() -> None:
    """Runs in the server and in every spawned worker (each re-imports the main module)."""
    build: Any = _echo_handler if os.environ.get(ECHO_ENV) == "1" else serve_mod.build_handler
    folder = os.environ.get(COUNTS_ENV)
    if folder:
        inner = build

        def build(*args: Any, **kwargs: Any) -> Any:
            return CountingHandler(inner(*args, **kwargs), folder)

    serve_mod.build_handler = build  # type: ignore[attr-defined]


_install()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--echo", action="store_true")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args()
    if args.echo and os.environ.get(ECHO_ENV) != "1":
        os.environ[ECHO_ENV] = "1"
        _install()

    def out(line: str) -> None:
        print(line, flush=True)

    return serve_mod.serve(
        args.home, listen=args.listen, workers=args.workers, log_level=args.log_level,
        out=out, say=out,
    )


if __name__ == "__main__":
    sys.exit(main())
