"""``kms status``: ask a running KMS how it is, for a person or (``--json``) for a script.

Two questions to the server, both read-only: gRPC health checking (``grpc.health.v1``) on the
KMS port, and its ``/metrics`` (token, TPK versions, registry sizes, calls, peer KMSs, version).
Addresses default to ``[server] listen`` and ``[metrics] listen`` of the home's kms.toml.
Exit status 0 when the KMS is serving and its token answers, 1 otherwise (the report is
printed either way).
"""

from __future__ import annotations

import argparse
import json
import ssl
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from kms.cli.errors import CliError

SERVICE = "mikey.kms.v1.KeyManagement"


def _health(target: str, tls: Any, timeout: float) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(target) if tls is None else grpc.secure_channel(target, tls)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        return "unreachable" if code is grpc.StatusCode.UNAVAILABLE else f"error ({code})"
    finally:
        channel.close()


def _scrape(url: str, ca: Path | None, timeout: float) -> str:
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=None if ca is None else str(ca))
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:  # noqa: S310
            return str(r.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot read metrics at {url}: {reason}") from None


def summarise(text: str) -> dict[str, Any]:
    """The status report out of a ``/metrics`` exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    s: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            s[smp.name].append((smp.labels, smp.value))

    def one(name: str) -> float | None:
        return s[name][0][1] if s.get(name) else None

    build = s.get("kms_build_info", [])
    token_up = one("kms_token_up")
    created = one("kms_tpk_current_created_timestamp_seconds")
    max_age = one("kms_tpk_max_age_seconds")
    age = None if created is None else max(time.time() - created, 0.0)
    calls: dict[str, dict[str, int]] = defaultdict(dict)
    for labels, v in s.get("kms_calls_total", []):
        by = calls[labels.get("method", "?")]
        by[labels.get("outcome", "?")] = by.get(labels.get("outcome", "?"), 0) + int(v)
    peers: dict[str, dict[str, Any]] = {}
    for labels, v in s.get("kms_federation_calls_total", []):
        p = peers.setdefault(labels.get("peer", "?"), {"calls": {}, "reachable": None})
        p["calls"][labels.get("outcome", "?")] = int(v)
    for labels, v in s.get("kms_federation_peer_up", []):
        peers.setdefault(labels.get("peer", "?"), {"calls": {}})["reachable"] = v >= 1
    return {
        "version": build[0][0].get("version") if build else None,
        "token": {
            "up": None if token_up is None else token_up >= 1,
            "reconnects": int(one("kms_token_reconnects_total") or 0),
        },
        "tpk": {
            "current_version": None if one("kms_tpk_current_version") is None
            else int(one("kms_tpk_current_version") or 0),
            "versions": {ls["state"]: int(v) for ls, v in s.get("kms_tpk_versions", [])},
            "current_age_s": None if age is None else int(age),
            "max_age_s": None if max_age is None else int(max_age),
            "rotation_due": None if age is None or max_age is None else age > max_age,
        },
        "registry": {ls["kind"]: int(v) for ls, v in s.get("kms_registry_entries", [])},
        "calls": dict(calls),
        "refusals": {
            "replay": int(sum(v for _, v in s.get("kms_replay_refusals_total", []))),
            "rate_limit": int(sum(v for _, v in s.get("kms_rate_limit_refusals_total", []))),
        },
        "peers": peers,
    }


def _days(seconds: int | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds / 86400:.1f} days"


def render(report: dict[str, Any]) -> str:
    """The report for a person, one fact per line."""
    tok = report.get("token") or {}
    tpk = report.get("tpk") or {}
    up = tok.get("up")
    lines = [
        f"KMS           {report['target']}: {report['health']}",
        f"version       {report.get('version') or '?'}",
        f"token         {'up' if up else 'DOWN' if up is False else '?'}"
        f" (reconnects: {tok.get('reconnects', 0)})",
    ]
    if tpk:
        versions = ", ".join(f"{n} {k}" for k, n in sorted((tpk.get("versions") or {}).items()))
        due = " - ROTATION DUE" if tpk.get("rotation_due") else ""
        lines.append(
            f"TPK           current v{tpk.get('current_version')}, age "
            f"{_days(tpk.get('current_age_s'))} of {_days(tpk.get('max_age_s'))}{due}"
            f" ({versions})"
        )
    reg = report.get("registry") or {}
    if reg:
        lines.append("registry      " + ", ".join(f"{n} {k}" for k, n in sorted(reg.items())))
    for method, by in sorted((report.get("calls") or {}).items()):
        total = sum(by.values())
        detail = ", ".join(f"{n} {o}" for o, n in sorted(by.items()))
        lines.append(f"calls         {method}: {total} ({detail})")
    ref = report.get("refusals") or {}
    if ref:
        lines.append(f"refusals      {ref.get('replay', 0)} replays, "
                     f"{ref.get('rate_limit', 0)} rate-limited")
    peers = report.get("peers") or {}
    n_peers = reg.get("peers")
    if not peers:
        lines.append(f"peers         {n_peers if n_peers is not None else '?'} registered, "
                     "no resolve forwarded yet")
    for name, p in sorted(peers.items()):
        r = p.get("reachable")
        state = "reachable" if r else "UNREACHABLE" if r is False else "?"
        calls = ", ".join(f"{n} {o}" for o, n in sorted(p.get("calls", {}).items()))
        lines.append(f"peer          {name}: {state} at last forwarded resolve ({calls})")
    if report.get("metrics_error"):
        lines.append(f"metrics       {report['metrics_error']}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from kms.server.config import ConfigError, load_config

    target, metrics, tls, ca = args.target, args.metrics, None, args.metrics_ca
    try:
        config = load_config(args.home)
    except ConfigError as exc:
        if target is None or metrics is None:
            raise CliError(f"{exc} (or give --target and --metrics)") from None
        config = None
    if config is not None:
        target = target or config.server.listen
        if metrics is None and config.metrics.listen is not None:
            scheme = "https" if config.metrics.tls_cert is not None else "http"
            metrics = f"{scheme}://{config.metrics.listen}/metrics"
            ca = ca or config.metrics.tls_cert
        if config.server.tls_cert is not None:
            import grpc

            root = (args.ca or config.server.tls_cert).read_bytes()
            cert = key = None
            if args.cert is not None and args.key is not None:
                cert, key = args.cert.read_bytes(), args.key.read_bytes()
            tls = grpc.ssl_channel_credentials(root, key, cert)
    if metrics is not None and "://" not in metrics:
        metrics = f"http://{metrics}/metrics"
    report: dict[str, Any] = {"target": target, "health": _health(target, tls, args.timeout)}
    if metrics is None:
        report["metrics_error"] = "off ([metrics] listen not set in kms.toml; or --metrics)"
    else:
        report["metrics"] = metrics
        try:
            report.update(summarise(_scrape(metrics, ca, args.timeout)))
        except CliError as exc:
            report["metrics_error"] = str(exc)
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else render(report))
    healthy = report["health"] == "SERVING" and (report.get("token") or {}).get("up") is True
    return 0 if healthy else 1


def register(sub: Any) -> None:  # argparse._SubParsersAction
    p = sub.add_parser(
        "status",
        help="ask a running KMS for its health, token, TPKs, peers and counts",
        description=(
            "Ask a running `kms serve` (gRPC health checking on its port, and its Prometheus "
            "/metrics) how it is: health, token up or down, TPK versions and the age of the "
            "current one, registry sizes, calls by outcome, peer KMSs reachable at the last "
            "forwarded resolve, version. Exit status 0 when serving with the token up, "
            "else 1. Addresses default to [server] listen and [metrics] listen in kms.toml."
        ),
    )
    p.add_argument("--target", metavar="HOST:PORT", help="gRPC address of the KMS")
    p.add_argument("--metrics", metavar="URL",
                   help="its /metrics (http[s]://HOST:PORT/metrics, or HOST:PORT)")
    p.add_argument("--metrics-ca", type=Path, metavar="PEM",
                   help="CA for an https /metrics (default: [metrics] tls_cert)")
    p.add_argument("--ca", type=Path, metavar="PEM",
                   help="CA of the gRPC server certificate (default: [server] tls_cert)")
    p.add_argument("--cert", type=Path, metavar="PEM", help="client certificate (mutual TLS)")
    p.add_argument("--key", type=Path, metavar="PEM", help="client key (mutual TLS)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="per question (default: 5)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_status)
