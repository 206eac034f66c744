"""``kms peer``: the peer KMSs of this KMS (federation, RFC 6043 9).

A peer entry serves both directions of a federated resolve:

* this KMS forwards a ticket issued by the peer to ``--address`` (mutual TLS, the peer's
  server certificate checked against ``--ca``), authenticating with the shared key;
* the peer may forward tickets issued by this KMS to us, resolving on behalf of identities
  matching ``--resolve-for`` (nothing by default), at most ``--rate`` per second.

The key shared with the peer (``--psk-hex`` / ``--psk-file``: generated once, given to both
operators) goes into the token as a sensitive, non-extractable secret like an endpoint PSK.
Instead of a shared key, ``--cert`` names the peer's KMS certificates (its ``kms-cert.pem``
and ``kms-signing-cert.pem`` concatenated): resolves then travel as RESOLVE_INIT_PK signed
with this KMS's token-held signing key, env_key encrypted to the peer's envelope key.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from kms.cli.admin import (
    _errors_to_cli,
    _json_flag,
    _open,
    _print_table,
    _show_time,
)
from kms.cli.errors import CliError
from kms.cli.psk_input import read_psk
from kms.server.config import URI_RE, is_loopback
from kms.server.directory import split_peer_certs
from kms.server.federation import peer_target
from kms.store.registry import show_identity


def _kms_id(text: str) -> bytes:
    if not URI_RE.match(text):
        raise CliError(f"KMS id {text!r} is not a URI (e.g. kms:kms.example.org)")
    return os.fsencode(text)


def _read_pem(path: str, option: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"{option} {path}: {exc.strerror}") from None
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CliError(f"{option} {path}: not a PEM certificate") from None
    return data.decode("ascii")


def _check_peer_certs(pem: str, kms_id: bytes) -> None:
    """``--cert``: the peer's envelope certificate (keyUsage keyEncipherment) and signing
    certificate (digitalSignature), RSA, each naming the peer's KMS id as a SAN URI."""
    for cert in x509.load_pem_x509_certificates(pem.encode("ascii")):
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if kms_id not in [u.encode("utf-8") for u in uris]:
            raise CliError(
                f"--cert: certificate {cert.subject.rfc4514_string()!r} does not name "
                f"{show_identity(kms_id)} as a subjectAltName URI"
            )
        if not isinstance(cert.public_key(), rsa.RSAPublicKey):
            raise CliError("--cert: peer KMS certificates must hold RSA keys")
    # Classified exactly as the serving KMS will read them (keyUsage; none counts as both).
    envelope, signing = split_peer_certs(pem)
    if envelope is None or not signing:
        raise CliError(
            "--cert must hold the peer's envelope certificate (kms-cert.pem) and its signing "
            "certificate (kms-signing-cert.pem), e.g. both files concatenated"
        )


def checked_address(address: str) -> list[str]:
    """The hosts of ``--address`` (HOST:PORT, or IP:PORT,... for a cluster), or a CliError."""
    try:
        return peer_target(address)[1]
    except ValueError as exc:
        raise CliError(f"--address {address}: {exc}") from None


def check_rate(rate: float) -> None:
    if rate < 0:
        raise CliError("--rate must be >= 0 (0: unlimited)")


def check_deadline(deadline_ms: int) -> None:
    if not 1 <= deadline_ms <= 60_000:
        raise CliError("--deadline-ms must be 1..60000")


@_errors_to_cli
def cmd_peer_add(args: argparse.Namespace) -> int:
    kms_id = _kms_id(args.kms_id)
    hosts = checked_address(args.address)
    psk: bytes | None = None
    if args.psk_hex is not None or args.psk_file is not None:
        psk = read_psk(args.psk_hex, args.psk_file, "--psk")
    cert_pem = None if args.cert is None else _read_pem(args.cert, "--cert")
    if cert_pem is not None:
        _check_peer_certs(cert_pem, kms_id)
    ca_pem = None if args.ca is None else _read_pem(args.ca, "--ca")
    check_rate(args.rate)
    patterns = tuple(args.resolve_for or ())
    if any(not p or "\n" in p for p in patterns):
        raise CliError("--resolve-for patterns must be non-empty single lines")
    with _open(args) as h:
        deadline_ms = args.deadline_ms or h.config.federation.default_deadline_ms
        check_deadline(deadline_ms)
        peer = h.add_peer(
            kms_id, args.address, psk=psk, cert_pem=cert_pem, ca_pem=ca_pem,
            resolve_for=patterns, rate_limit=args.rate, deadline_ms=deadline_ms,
        )  # fmt: skip
        plaintext_ok = h.config.federation.allow_plaintext
    print(
        f"added peer KMS {show_identity(peer.kms_id)} at {peer.address} ({peer.auth.value}"
        + (f", key {peer.key_label}" if peer.key_label else "")
        + ")"
    )
    print("  may resolve for: " + (", ".join(patterns) if patterns else "nobody"))
    if psk is None:
        print("  authenticated by certificate: RESOLVE_INIT_PK signed with our kms/signing key")
    if ca_pem is None:
        how = (
            "plaintext (loopback, [federation] allow_plaintext)"
            if plaintext_ok and all(is_loopback(h) for h in hosts)
            else "TLS checked against the system CA roots (give --ca for a private CA)"
        )
        print(f"  transport: {how}")
    return 0


@_errors_to_cli
def cmd_peer_remove(args: argparse.Namespace) -> int:
    with _open(args) as h:
        peer = h.remove_peer(_kms_id(args.kms_id))
    print(
        f"removed peer KMS {show_identity(peer.kms_id)}"
        + (f" and destroyed key {peer.key_label}" if peer.key_label else "")
    )
    return 0


@_errors_to_cli
def cmd_peer_list(args: argparse.Namespace) -> int:
    with _open(args) as h:
        peers = h.registry.list_peers()
    if args.json:
        out: list[dict[str, Any]] = [
            {
                "kms_id": show_identity(p.kms_id),
                "address": p.address,
                "auth": p.auth.value,
                "key_label": p.key_label,
                "ca": p.ca_pem is not None,
                "resolve_for": list(p.resolve_for),
                "rate_per_s": p.rate_limit,
                "deadline_ms": p.deadline_ms,
                "send_version": p.send_version,
                "created_at": _show_time(p.created_at),
            }
            for p in peers
        ]
        print(json.dumps(out, indent=2))
        return 0
    _print_table(
        [
            [show_identity(p.kms_id), p.address, p.auth.value, p.key_label or "-",
             "yes" if p.ca_pem else "no", ",".join(p.resolve_for) or "-",
             f"{p.rate_limit:g}" if p.rate_limit else "-", str(p.deadline_ms)]
            for p in peers
        ],
        ["KMS ID", "ADDRESS", "AUTH", "KEY LABEL", "CA", "RESOLVE FOR", "RATE/S", "DEADLINE MS"],
    )  # fmt: skip
    return 0


def register(sub: Any) -> None:  # argparse._SubParsersAction
    """Add ``kms peer`` to the ``kms`` parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "peer",
        help="manage peer KMSs (federation: resolving other KMSs' tickets)",
        description="Manage the peer KMSs this KMS resolves tickets with (RFC 6043 9).",
    )
    psub = p.add_subparsers(dest="peer_command", metavar="SUBCOMMAND", required=True)

    q = psub.add_parser(
        "add",
        help="register a peer KMS and import the key shared with it",
        formatter_class=fmt,
        description=(
            "Register KMS-ID (the peer's [kms] id) listening at --address. Tickets issued by\n"
            "it are resolved by calling it there over mutual TLS (its certificate checked\n"
            "against --ca, else the system roots). The key shared with the peer (16..32 bytes\n"
            "hex; generate it once and give it to both operators) is stored in the token as\n"
            "a sensitive, non-extractable secret.\n\n"
            "--cert instead of a shared key: the peer's KMS certificates, i.e. its\n"
            "kms-cert.pem (envelope key: we encrypt env_key to it) and kms-signing-cert.pem\n"
            "(pinned: its RESOLVE_INIT_PK must be signed with that key) concatenated in one\n"
            "PEM file; both must name KMS-ID as subjectAltName URI. We sign our RESOLVE_INIT_PK\n"
            "to the peer with our token-held kms/signing key, so the peer needs our two\n"
            "certificates too. No [pk] ca_bundle is needed for that: the peer is pinned.\n\n"
            "--resolve-for: identity patterns (shell globs, e.g. 'sip:*@b.example.org') the\n"
            "peer may resolve OUR tickets for; none given: it may resolve none. --rate: how\n"
            "many resolves per second it may ask of us (0: unlimited). --deadline-ms: how\n"
            "long we wait for it, retries included (default [federation] default_deadline_ms).\n"
            "A running `kms serve` picks the new peer up on its first use."
        ),
    )
    q.add_argument("kms_id", metavar="KMS-ID", help="e.g. kms:kms.b.example.org")
    q.add_argument(
        "--address", required=True, metavar="HOST:PORT",
        help="where the peer's `kms serve` listens; a cluster: its HAProxy, a DNS name with "
        "one record per replica, or IP:PORT,IP:PORT,...",
    )
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--psk-hex", metavar="HEX", help="the shared key in hexadecimal")
    src.add_argument("--psk-file", metavar="FILE", help="file holding the shared key in hex")
    src.add_argument(
        "--cert",
        metavar="PEM",
        help="the peer's kms-cert.pem + kms-signing-cert.pem (certificate peer, no shared key)",
    )
    q.add_argument("--ca", metavar="PEM", help="CA certificate(s) of the peer's TLS server")
    q.add_argument(
        "--resolve-for",
        action="append",
        metavar="PATTERN",
        help="identity pattern the peer may resolve for (repeatable)",
    )
    q.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="N",
        help="resolves per second the peer may ask of us (default 0: unlimited)",
    )
    q.add_argument(
        "--deadline-ms",
        type=int,
        default=None,
        metavar="N",
        help="deadline for calls to the peer, retries included",
    )
    q.set_defaults(func=cmd_peer_add)

    q = psub.add_parser(
        "remove",
        help="unregister a peer KMS and destroy the shared key",
        description="Unregister KMS-ID and destroy the key shared with it.",
    )
    q.add_argument("kms_id", metavar="KMS-ID")
    q.set_defaults(func=cmd_peer_remove)

    q = psub.add_parser(
        "list",
        help="list peer KMSs (addresses, trust, quotas; never keys)",
        description="List the peer KMSs with their address, trust patterns and quotas.",
    )
    _json_flag(q)
    q.set_defaults(func=cmd_peer_list)


__all__ = ["register"]
