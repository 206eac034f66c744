"""The benchmark's servers: the real ``kms serve``, or the same stack with an echo handler.

    python -m bench.echo --home H --listen 127.0.0.1:P --workers N [--echo]

Both run :func:`kms.server.serve.serve` unchanged: the same supervisor and ``spawn``ed worker
processes sharing the port with SO_REUSEPORT, the same :class:`KmsServer` (thread pool of
``DEFAULT_THREADS``, ``maximum_concurrent_rpcs``, options, health and reflection), the same
:class:`KmsServicer` (correlation id, initial and trailing metadata, status mapping). With
``--echo`` (environment ``KMS_BENCH_ECHO=1``, so that spawned workers see it too when they
re-import this module as ``__mp_main__``) the composition root's ``build_handler`` is
replaced by :class:`EchoHandler`, which answers every call with the request bytes: the
floor of "a call through our server" with no MIKEY, no token and no state.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kms.server.serve as serve_mod
from kms.core.api import KmsReply, Outcome

ECHO_ENV = "KMS_BENCH_ECHO"


class EchoHandler:
    """:class:`kms.core.api.KmsHandler` that returns the request as the response."""

    def request_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> KmsReply:
        return KmsReply(Outcome.OK, wire)

    def resolve_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> KmsReply:
        return KmsReply(Outcome.OK, wire)


def _echo_handler(*_args: Any, **_kwargs: Any) -> Any:
    return EchoHandler()


if os.environ.get(ECHO_ENV) == "1":
    # Also runs in every spawned worker (it re-imports the main module).
    serve_mod.build_handler = _echo_handler  # type: ignore[attr-defined]


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
        serve_mod.build_handler = _echo_handler  # type: ignore[attr-defined]

    def out(line: str) -> None:
        print(line, flush=True)

    return serve_mod.serve(
        args.home, listen=args.listen, workers=args.workers, log_level=args.log_level,
        out=out, say=out,
    )


if __name__ == "__main__":
    sys.exit(main())
