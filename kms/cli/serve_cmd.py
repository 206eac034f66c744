"""``kms serve``: run the gRPC KMS (see :mod:`kms.server.serve` for the process model)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kms.cli.errors import CliError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def cmd_serve(args: argparse.Namespace) -> int:
    # Imported here: grpc and the generated stubs are only needed by this command.
    from kms.server import serve as serve_mod

    def say(msg: str) -> None:
        print(f"kms serve: {msg}", file=sys.stderr, flush=True)

    def out(line: str) -> None:
        print(line, flush=True)

    try:
        return serve_mod.serve(
            args.home,
            listen=args.listen,
            workers=args.workers,
            threads=args.threads,
            grace=args.grace,
            log_level=args.log_level,
            kms_id=args.kms_id,
            metrics_listen=args.metrics_listen,
            out=out,
            say=say,
        )
    except serve_mod.EXPECTED_ERRORS as exc:
        if isinstance(exc, OSError) and exc.strerror:
            where = f" {exc.filename}" if exc.filename else ""
            raise CliError(f"{exc.strerror}:{where}") from None
        raise CliError(serve_mod.one_line(exc)) from None


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def register(sub: Any) -> None:  # argparse._SubParsersAction
    p = sub.add_parser(
        "serve",
        help="serve the KMS over gRPC (initialises an empty home first)",
        description=(
            "Serve mikey.kms.v1.KeyManagement (plus gRPC health checking and reflection) "
            "until SIGTERM/SIGINT, then drain in-flight calls and exit 0. Defaults come from "
            "[server] in kms.toml. A home without kms.toml is initialised first with an "
            "embedded SoftHSM2 token, like `kms init`."
        ),
    )
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on "
                   "(default: [server] listen, 127.0.0.1:50051)")
    p.add_argument("--workers", type=_positive(int), metavar="N",
                   help="worker processes sharing the port (default: [server] workers)")
    p.add_argument("--threads", type=_positive(int), metavar="N",
                   help="calls admitted per worker (default: 128; they wait for the event "
                   "loop or a core slot, see [server] core_calls and core_concurrency); more "
                   "are refused with RESOURCE_EXHAUSTED")
    p.add_argument("--grace", type=_positive(float), default=10.0, metavar="SECONDS",
                   help="how long in-flight calls may take after SIGTERM (default: 10)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="INFO", type=str.upper,
                   help="log level of the JSON log on stderr (default: INFO)")
    p.add_argument("--kms-id", metavar="URI",
                   help="KMS id when initialising an empty home (default: kms:<hostname>)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: "
                   "[metrics] listen; off when neither is set). Plain HTTP only on loopback "
                   "unless [metrics] has tls_cert/tls_key or allow_plaintext_non_loopback")
    p.set_defaults(func=cmd_serve)
