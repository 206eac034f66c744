"""``kms call``: a command-line endpoint for operators to test a deployment.

It requests a ticket over gRPC as one registered identity for one or more responders and
prints the granted ticket policy: flags by letter, validity, initiator, responders, key types
and SPIs, and a ticket id (SHA-256 of the Ticket Data). With ``--resolve-as`` it also plays
the Responder: transfers the ticket, resolves it at the KMS and shows that both ends derived
the same SRTP keys, by SPI and a fingerprint (a truncated hash), never by value.

No key, PSK or MPK value is ever printed. A refusal exits 1 with one line: the gRPC status,
its detail and the MIKEY error number from ``mikey-error-bin``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from kms.cli.errors import CliError
from kms.cli.psk_input import read_psk
from kms.mikey.base_ticket import ticket_id

FINGERPRINT_LABEL = b"kms call: SRTP key fingerprint\x00"


def _identity(text: str) -> bytes:
    return os.fsencode(text)


def _kms_id(args: argparse.Namespace) -> bytes:
    if args.kms_id:
        return _identity(args.kms_id)
    from kms.server.config import CONFIG_FILE, ConfigError, load_config

    home = Path(args.home)
    if (home / CONFIG_FILE).is_file():
        try:
            return load_config(home).kms_id_bytes
        except ConfigError as exc:
            raise CliError(str(exc)) from None
    raise CliError(f"--kms-id is required (no {CONFIG_FILE} in {home} to take it from)")


def _show(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


def _time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fingerprint(keys: Any) -> str:
    """A short, one-way fingerprint of the SRTP master keys and salts of a call."""
    h = hashlib.sha256(FINGERPRINT_LABEL)
    for k in keys:
        h.update(k.cs_id.to_bytes(1, "big") + k.key_and_salt)
    return h.hexdigest()[:16]


def describe_grant(grant: Any) -> dict[str, Any]:
    """The granted policy as JSON-ready data: never a key value."""
    from kms.mikey.constants import IdRole, KeyDataType, PrfFunc, TsRole, TsType
    from kms.mikey.ntp import decode_ts_value
    from kms.mikey.payloads import KvInterval, KvSpi
    from kms.mikey.ticket import Idr, TpFlag, Tr

    policy = grant.policy
    flags = "".join(f.name or "" for f in TpFlag if policy.flags & f)
    out: dict[str, Any] = {
        # The same handle the KMS's audit log records for this ticket.
        "ticket_id": ticket_id(grant.ticket.ticket_data),
        "ticket_type": policy.ticket_type,
        "prf": PrfFunc(policy.prf_func).name
        if policy.prf_func in set(PrfFunc)
        else policy.prf_func,
        "flags": flags,
        "forking": bool(policy.flags & TpFlag.I),
        "reusable": bool(policy.flags & TpFlag.J),
        "policy_changed_by_kms": bool(policy.flags & TpFlag.K),
    }
    roles = {IdRole.IDRKMS: "kms", IdRole.IDRI: "initiator"}
    responders: list[str] = []
    applications: list[str] = []
    for p in policy.payloads:
        if isinstance(p, Idr):
            if p.role in roles:
                out[roles[IdRole(p.role)]] = _show(p.data)
            elif p.role == IdRole.IDRR:
                responders.append(_show(p.data))
            elif p.role == IdRole.IDRAPP:
                applications.append(_show(p.data))
        elif isinstance(p, Tr) and p.role in (TsRole.TRI, TsRole.TRS, TsRole.TRE):
            name = {TsRole.TRI: "issued", TsRole.TRS: "valid_from", TsRole.TRE: "valid_to"}
            try:
                out[name[TsRole(p.role)]] = _time(decode_ts_value(TsType(p.ts_type), p.value))
            except ValueError:
                out[name[TsRole(p.role)]] = f"counter {p.value.hex()}"
    out["responders"] = responders
    if applications:
        out["applications"] = applications
    keys = []
    for k in grant.session_keys:
        try:
            kt = KeyDataType(k.key_type).name
        except ValueError:
            kt = str(k.key_type)
        item: dict[str, Any] = {"type": kt, "bits": 8 * len(k.key), "salted": k.salt is not None}
        if isinstance(k.kv, KvSpi):
            item["spi"] = k.kv.spi.hex()
        elif isinstance(k.kv, KvInterval):
            item["valid"] = [k.kv.valid_from.hex(), k.kv.valid_to.hex()]
        keys.append(item)
    out["keys"] = keys
    return out


def cmd_call(args: argparse.Namespace) -> int:
    # grpc and the generated stubs are only needed by this command.
    from kms.endpoint import client as client_mod
    from kms.endpoint.common import Credentials
    from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy, Initiator
    from kms.endpoint.responder import Responder
    from kms.endpoint.session import CryptoSession, EndpointError
    from kms.home import guess_id_type
    from kms.mikey.ticket import TpFlag

    try:
        from hsm.software import SoftwareKeyStore
    except ImportError as exc:  # pragma: no cover - part of this package
        raise CliError(f"software key store unavailable: {exc}") from None

    kms_id = _kms_id(args)
    identity = _identity(args.identity)
    psk = read_psk(args.psk_hex, args.psk_file, "--psk")
    responders = tuple(_identity(r) for r in args.to)
    flags = DEFAULT_FLAGS | (TpFlag.I if args.forking else TpFlag(0))
    flags |= TpFlag.J if args.reusable else TpFlag(0)
    desired = DesiredPolicy(responders=responders, flags=TpFlag(flags), lifetime_s=args.lifetime)
    ks = SoftwareKeyStore()

    def creds(ident: bytes, key: bytes, psk_name: str | None = None) -> Credentials:
        # psk_name: the PSK version (`kms endpoint rotate-psk`), sent as IDRpsk.
        name = _identity(psk_name) if psk_name else None
        return Credentials(
            ident, key, kms_id, guess_id_type(ident), guess_id_type(kms_id), psk_name=name
        )

    tls: dict[str, Any] = {}
    if args.tls_ca or args.tls:
        tls["tls"] = True
        tls["root_certificates"] = Path(args.tls_ca) if args.tls_ca else None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise CliError("--tls-cert and --tls-key go together")
        tls.update(tls=True, certificate_chain=Path(args.tls_cert), private_key=Path(args.tls_key))

    resolver: Responder | None = None
    if args.resolve_as is not None:
        if args.resolve_psk_hex is None and args.resolve_psk_file is None:
            raise CliError("--resolve-as needs --resolve-psk-hex or --resolve-psk-file")
        rpsk = read_psk(args.resolve_psk_hex, args.resolve_psk_file, "--resolve-psk")
        resolver = Responder(
            creds(_identity(args.resolve_as), rpsk, args.resolve_psk_name), ks
        )

    stage = "RequestTicket"
    try:
        with client_mod.KmsClient(args.target, timeout=args.timeout, **tls) as kms:
            ini = Initiator(creds(identity, psk, args.psk_name), ks)
            grant = client_mod.obtain_ticket(kms, ini, desired)
            report: dict[str, Any] = {"target": args.target, "ticket": describe_grant(grant)}
            if resolver is not None:
                stage = "ResolveTicket"
                me = resolver.creds.identity
                to = me if me in responders else responders[0]
                sessions = [CryptoSession(1, 0x4B4D5301)]
                call = client_mod.run_call(
                    kms, ini, kms, resolver, grant=grant, to=to, sessions=sessions
                )
                a, b = call.initiator.srtp, call.responder.srtp
                agree = [x.key_and_salt for x in a] == [y.key_and_salt for y in b]
                report["call"] = {
                    "transferred_to": _show(to),
                    "resolved_by": _show(me),
                    "transfer_resp": call.responder.transfer_resp is not None,
                    "crypto_sessions": [
                        {
                            "cs_id": k.cs_id,
                            "ssrc": f"{k.ssrc:08x}",
                            "profile": k.profile.name,
                            "spi": k.spi.hex(),
                        }
                        for k in a
                    ],
                    "initiator_fingerprint": fingerprint(a),
                    "responder_fingerprint": fingerprint(b),
                    "keys_agree": agree,
                }
    except client_mod.KmsRefused as exc:
        raise CliError(f"{stage} refused by {args.target}: {exc}") from None
    except EndpointError as exc:
        raise CliError(f"{stage}: response rejected: {exc}") from None
    except (ValueError, OSError) as exc:
        raise CliError(f"{type(exc).__name__}: {exc}") from None

    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    if "call" in report and not report["call"]["keys_agree"]:
        print("kms: error: the two ends derived different SRTP keys", file=sys.stderr)
        return 2
    return 0


def _print_report(report: dict[str, Any]) -> None:
    t = report["ticket"]
    print(f"ticket granted by {report['target']}")
    rows = [
        ("ticket id", t["ticket_id"]),
        ("kms", t.get("kms", "-")),
        ("initiator", t.get("initiator", "-")),
        ("responders", ", ".join(t["responders"]) or "-"),
        (
            "flags",
            t["flags"] + (" (policy changed by the KMS)" if t["policy_changed_by_kms"] else ""),
        ),
        ("prf", str(t["prf"])),
        # RFC 6043 6.10: an omitted TRs / TRe means no lower / upper bound.
        ("valid", f"{t.get('valid_from', 'any time')} .. {t.get('valid_to', 'no end')}"),
    ]
    for k in t["keys"]:
        spi = f" spi {k['spi']}" if "spi" in k else ""
        rows.append(("key", f"{k['type']} {k['bits']} bits{spi}"))
    for name, value in rows:
        print(f"  {name + ':':<12} {value}")
    c = report.get("call")
    if c is not None:
        print(f"call to {c['transferred_to']} resolved by {c['resolved_by']}")
        for s in c["crypto_sessions"]:
            spi = f" spi {s['spi']}" if s["spi"] else ""
            print(f"  cs {s['cs_id']}: ssrc {s['ssrc']} {s['profile']}{spi}")
        print(
            f"  fingerprint: initiator {c['initiator_fingerprint']} "
            f"responder {c['responder_fingerprint']}"
        )
        print("  both ends agree on the SRTP keys" if c["keys_agree"] else "  the SRTP keys DIFFER")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def register(sub: Any) -> None:  # argparse._SubParsersAction
    p = sub.add_parser(
        "call",
        help="request a ticket from a running KMS (an endpoint for testing a deployment)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Request a ticket over gRPC as IDENTITY for the --to responders and print the\n"
            "granted policy (flags, validity, responders, key types, SPIs, ticket id); with\n"
            "--resolve-as, also transfer it and resolve it as that responder and show that\n"
            "both ends agree (by fingerprint). Key values are never printed. The KMS id comes\n"
            "from --kms-id, else from kms.toml in --home. A refusal exits 1 with the gRPC\n"
            "status, its detail and the MIKEY error number."
        ),
    )
    p.add_argument(
        "--target", required=True, metavar="HOST:PORT[,HOST:PORT...]",
        help="the KMS address; several (comma-separated) or dns:///NAME:PORT for a cluster: "
        "calls go round-robin and an unreachable replica is retried on the next one with a "
        "fresh message",
    )
    p.add_argument("--identity", required=True, metavar="ID", help="the Initiator identity")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--psk-hex", metavar="HEX", help="the Initiator's PSK in hexadecimal")
    src.add_argument("--psk-file", metavar="FILE", help="file holding the PSK in hexadecimal")
    p.add_argument(
        "--psk-name",
        metavar="NAME",
        help="the PSK version this PSK is, as `kms endpoint rotate-psk` printed it (sent as "
        "IDRpsk); default: the endpoint's registered PSK",
    )
    p.add_argument(
        "--to",
        required=True,
        action="append",
        metavar="RESPONDER",
        help="a responder identity or group (repeat for several)",
    )
    p.add_argument("--kms-id", metavar="URI", help="the KMS identity (IDRkms)")
    p.add_argument("--forking", action="store_true", help="ask for key forking (flag I)")
    p.add_argument("--reusable", action="store_true", help="ask for a reusable ticket (J)")
    p.add_argument(
        "--lifetime",
        type=_positive_int,
        metavar="S",
        help="desired ticket lifetime in seconds (default: none asked; the KMS then sets its "
        "default end and says so with flag K)",
    )
    p.add_argument("--resolve-as", metavar="ID", help="also resolve the ticket as ID")
    rsrc = p.add_mutually_exclusive_group()
    rsrc.add_argument("--resolve-psk-hex", metavar="HEX", help="PSK of --resolve-as (hex)")
    rsrc.add_argument("--resolve-psk-file", metavar="FILE", help="file with that PSK (hex)")
    p.add_argument("--resolve-psk-name", metavar="NAME",
                   help="PSK version of --resolve-as (as --psk-name)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    p.add_argument("--tls-ca", metavar="PEM", help="CA certificate(s) of the server (TLS)")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", metavar="PEM", help="client private key (mutual TLS)")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="per-call deadline in seconds (default: 10)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_call)


__all__ = ["cmd_call", "describe_grant", "fingerprint", "register"]
