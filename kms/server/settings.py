"""Every ``kms.toml`` setting, declared once: section, key, type, default, bounds, doc.

:mod:`kms.server.config` parses with these declarations (types, bounds, choices, defaults;
the error messages name the section and key), the settings dataclasses take their defaults
from them, :func:`kms.server.config.render_config` writes the template ``kms init``
installs from them, and :func:`settings_markdown` renders the table in
``docs/configuration.md`` (a test keeps that file in step). Policy defaults that the core
also needs are read from :class:`kms.core.policy.KmsPolicy` instead of being restated.

``[kms]`` and ``[token]`` are declared here too, but have no defaults worth rendering: they
name this KMS and its token, and ``kms init`` fills them from its arguments.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kms.core.policy import Forking, KmsPolicy
from kms.keystore import RsaPadding
from kms.mikey.prf import PrfFunc

__all__ = [
    "SECTIONS",
    "SETTINGS",
    "Forking",
    "IntermediateNodes",
    "Kind",
    "KeyTypeName",
    "PrfName",
    "CoreCalls",
    "Responders",
    "RsaPadding",
    "Section",
    "Setting",
    "StoreBackend",
    "default",
    "setting",
    "settings_markdown",
]


class PrfName(StrEnum):
    """``[policy] prf``: the weakest PRF accepted and granted (RFC 6043 12.1)."""

    HMAC_SHA_1 = "hmac-sha-1"
    HMAC_SHA_256 = "hmac-sha-256"

    @property
    def func(self) -> PrfFunc:
        return PrfFunc.MIKEY_1 if self is PrfName.HMAC_SHA_1 else PrfFunc.PRF_HMAC_SHA_256


class KeyTypeName(StrEnum):
    """``[policy] allowed_key_types``: session key kinds (RFC 6043 6.13, with their salted
    variants)."""

    TGK = "tgk"
    TEK = "tek"
    GTGK = "gtgk"


class CoreCalls(StrEnum):
    """``[server] core_calls``: where a worker's KMS core calls run (kms.server.adapter)."""

    AUTO = "auto"
    INLINE = "inline"
    THREADS = "threads"


class Responders(StrEnum):
    """``[policy] responders``: any IDRr, or only registered endpoints and groups."""

    ANY = "any"
    REGISTERED = "registered"


class IntermediateNodes(StrEnum):
    """``[policy] intermediate_nodes``: whether registered intermediate nodes (RFC 6043 11.1:
    recorders, bridges, transcoders) may obtain call keys; nothing is in scope until one is
    registered with a scope (`kms node add`)."""

    ALLOWED = "allowed"
    FORBIDDEN = "forbidden"


class StoreBackend(StrEnum):
    """``[store] backend``: files in the home, or a PostgreSQL database shared by replicas."""

    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


class Kind(StrEnum):
    """How a value is written in TOML and checked."""

    STRING = "string"
    PATH = "path"  # a string; relative paths are resolved against the KMS home
    BOOL = "bool"
    INT = "int"
    CHOICE = "choice"  # one value of ``choices``
    LIST = "list"  # a non-empty list of distinct values of ``choices``


TEN_YEARS_S = 10 * 366 * 86400
_P = KmsPolicy(kms_id=b"")  # the core's policy defaults, read (not restated) below


@dataclass(frozen=True)
class Setting:
    """One key of one section."""

    section: str
    key: str
    kind: Kind
    default: Any
    doc: str
    minimum: int = 0
    maximum: int = 0
    choices: tuple[str, ...] = ()
    example: object = None
    """A valid value other than the default (template comments, docs, the every-key test)."""
    companions: Mapping[str, object] = field(default_factory=dict)
    """Other keys of the section the example needs to be valid (e.g. tls_key with tls_cert)."""

    @property
    def toml_default(self) -> str:
        return _toml(self.default)

    @property
    def toml_example(self) -> str:
        return _toml(self.example)

    @property
    def what(self) -> str:
        """The type as named in the docs table."""
        if self.kind is Kind.INT:
            return f"integer {self.minimum}..{self.maximum}"
        if self.kind is Kind.CHOICE:
            return " / ".join(f"`{c}`" for c in self.choices)
        if self.kind is Kind.LIST:
            return "list of " + ", ".join(f"`{c}`" for c in self.choices)
        return {Kind.STRING: "string", Kind.PATH: "path", Kind.BOOL: "true / false"}[self.kind]


@dataclass(frozen=True)
class Section:
    name: str
    doc: str
    required: bool = False
    in_template: bool = True  # [store] is written by `kms store migrate`, not by init


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, StrEnum):
        return json.dumps(value.value)
    if isinstance(value, tuple):
        return json.dumps([str(v) for v in value])
    return json.dumps(value)


def _choices(enum: type[StrEnum]) -> tuple[str, ...]:
    return tuple(e.value for e in enum)


S, K = Setting, Kind
_TLS_PAIR = {"tls_cert": "c.pem", "tls_key": "k.pem"}

SECTIONS: tuple[Section, ...] = (
    Section("kms", "The KMS identity.", required=True),
    Section("token", "PKCS#11 module and token holding every long-term key (PSKs, TPKs, RSA "
                     "keys); the user PIN from pin_env or pin_file, never the PIN itself.",
            required=True),
    Section("server", "The gRPC listener."),
    Section("policy", "The KMS-wide ticket policy (RFC 6043 4.2.1.4, 6.10)."),
    Section("pk", "Public-key exchanges (REQUEST_INIT_PK / RESOLVE_INIT_PK)."),
    Section("federation", "Calls to peer KMSs (`kms peer add`): mutual TLS, the peer checked "
                          "against its --ca (RFC 6043 9)."),
    Section("audit", "audit.log is rotated at max_bytes (audit.log.1 .. audit.log.<keep>); "
                     "0 = never: leave it to logrotate (rename, no copytruncate: the KMS "
                     "reopens a renamed log)."),
    Section("metrics", "Prometheus /metrics over HTTP, off unless listen is set (`kms serve "
                       "--metrics-listen` overrides). Loopback only, unless this section has "
                       "tls_cert and tls_key or sets allow_plaintext_non_loopback."),
    Section("tracing", "A span per call, token operation and forwarded resolve, exported over "
                       "OTLP/HTTP JSON; off unless otlp_endpoint is set."),
    Section("store", "Where the shared state lives: sqlite (files in the home, one host) or "
                     "postgresql (a database shared by every replica; never a password here: "
                     "password_file, password_env or PGPASSFILE).", in_template=False),
)

SETTINGS: tuple[Setting, ...] = (
    S("kms", "id", K.STRING, None, "The KMS identity, sent as IDRkms (a URI).",
      example="kms:kms.example.org"),
    S("token", "module", K.STRING, None, "PKCS#11 module path.", example="/usr/lib/m.so"),
    S("token", "label", K.STRING, None, "Token label.", example="kms"),
    S("token", "serial", K.STRING, None, "Token serial number (optional).", example="42"),
    S("token", "pin_env", K.STRING, None, "Environment variable holding the PIN.",
      example="KMS_PIN"),
    S("token", "pin_file", K.PATH, None, "File holding the PIN (mode 0600).",
      example="token/pin"),
    S("token", "softhsm_conf", K.PATH, None, "SOFTHSM2_CONF for a SoftHSM token.",
      example="token/softhsm2.conf"),
    S("token", "uri", K.STRING, None, "PKCS#11 URI (RFC 7512) of the token, beside or instead "
      "of the keys above (docs/hsm.md).", example="pkcs11:token=kms",
      companions={"label": "kms"}),
    # [server]
    S("server", "listen", K.STRING, "127.0.0.1:50051", "gRPC HOST:PORT; plaintext only on "
      "loopback unless allow_plaintext_non_loopback.", example="127.0.0.1:50099"),
    S("server", "workers", K.INT, 1, "Worker processes sharing the port (each logs in to the "
      "token itself).", 1, 256, example=2),
    S("server", "tls_cert", K.PATH, None, "Server certificate (PEM).", example="server.pem",
      companions={"tls_key": "server.key"}),
    S("server", "tls_key", K.PATH, None, "Server private key (PEM).", example="server.key",
      companions={"tls_cert": "server.pem"}),
    S("server", "tls_client_ca", K.PATH, None, "Require client certificates from this CA "
      "(mutual TLS).", example="clients-ca.pem", companions=_TLS_PAIR),
    S("server", "allow_plaintext_non_loopback", K.BOOL, False, "Accept plaintext gRPC off "
      "the loopback interface.", example=True),
    S("server", "core_concurrency", K.INT, 0, "KMS calls computed at once per worker; 0 = "
      "auto: 1 for SoftHSM (its threads only convoy on the GIL), 8 for other modules.", 0, 256,
      example=4),
    S("server", "core_calls", K.CHOICE, CoreCalls.AUTO, "Where KMS calls run: inline on "
      "the gRPC event loop (one core slot, no thread hand-off), or in threads (several "
      "slots compute at once; database waits leave the loop free); auto = inline with one "
      "core slot and SQLite stores, threads otherwise.", choices=_choices(CoreCalls),
      example=CoreCalls.THREADS),
    S("server", "request_timeout_ms", K.INT, 2000, "How long a call may take to send its "
      "request message.", 50, 60_000, example=500),
    S("server", "max_calls_per_peer", K.INT, 96, "Calls one peer address may hold at once.",
      1, 100_000, example=8),
    S("server", "max_streams_per_connection", K.INT, 32, "HTTP/2 streams per connection.",
      1, 1024, example=4),
    # [policy]
    S("policy", "prf", K.CHOICE, PrfName.HMAC_SHA_1, "Weakest PRF accepted (message headers) "
      "and granted (tickets): hmac-sha-1 accepts MIKEY_1 and PRF_HMAC_SHA_256, hmac-sha-256 "
      "only PRF_HMAC_SHA_256.", choices=_choices(PrfName), example=PrfName.HMAC_SHA_256),
    S("policy", "allowed_key_types", K.LIST, tuple(KeyTypeName), "Session key types issued.",
      choices=_choices(KeyTypeName), example=(KeyTypeName.TEK,)),
    S("policy", "max_lifetime_s", K.INT, _P.max_lifetime_s, "Ticket validity cap.", 1,
      TEN_YEARS_S, example=7200),
    S("policy", "default_lifetime_s", K.INT, _P.default_lifetime_s, "Ticket validity when "
      "none is asked for.", 1, TEN_YEARS_S, example=600),
    S("policy", "forking", K.CHOICE, _P.forking, "Whether tickets may (allowed), must "
      "(required) or must not (forbidden) allow forking.", choices=_choices(Forking),
      example=Forking.FORBIDDEN),
    S("policy", "reuse_allowed", K.BOOL, _P.reuse_allowed, "Whether flag J (ticket reuse) "
      "may be granted.", example=False),
    S("policy", "responders", K.CHOICE, Responders.ANY, "Any responder identity, or only "
      "registered endpoints and groups (federation: responders of other domains are never "
      "registered here, so keep any there).", choices=_choices(Responders),
      example=Responders.REGISTERED),
    S("policy", "intermediate_nodes", K.CHOICE, IntermediateNodes.ALLOWED, "Whether registered "
      "intermediate nodes (recorders, bridges, transcoders; RFC 6043 11.1) may obtain the keys "
      "of calls in their scope (`kms node add`; none is registered by default).",
      choices=_choices(IntermediateNodes), example=IntermediateNodes.FORBIDDEN),
    S("policy", "timestamp_window_s", K.INT, _P.timestamp_window_s, "Accepted clock skew and "
      "replay window.", 1, 86400, example=30),
    S("policy", "replay_cache_size", K.INT, 0, "Replay cache entries (live ones are never "
      "dropped: when it is full, new messages are refused with RESOURCE_EXHAUSTED); 0 = auto: "
      "2 x timestamp_window_s x 1000/s per worker.", 0, 100_000_000, example=5000),
    S("policy", "rate_limit_per_s", K.INT, 50, "Requests per second per identity; 0 = off.",
      0, 1_000_000, example=5),
    # [pk]
    S("pk", "ca_bundle", K.PATH, None, "CA certificates for CERTi / CERTr; enables the PK "
      "exchanges.", example="endpoint-ca.pem"),
    S("pk", "pke_padding", K.CHOICE, RsaPadding.PKCS1V15, "RSA padding of the PKE payload: "
      "pkcs1v15 (RFC 3830 mandatory) or oaep-sha1.", choices=_choices(RsaPadding),
      example=RsaPadding.OAEP_SHA1),
    S("pk", "crl", K.PATH, None, "CRLs (a PEM/DER file or a folder of them), re-read when they "
      "change; a revoked certificate is refused, and so is every certificate of an issuer "
      "whose CRL expired.", example="crls"),
    # [federation]
    S("federation", "client_cert", K.PATH, None, "Client certificate for peers (default: "
      "[server] tls_cert).", example="federation.pem",
      companions={"client_key": "federation.key"}),
    S("federation", "client_key", K.PATH, None, "Its key (default: [server] tls_key).",
      example="federation.key", companions={"client_cert": "federation.pem"}),
    S("federation", "allow_plaintext", K.BOOL, False, "Plaintext to loopback peers registered "
      "without --ca (tests, one-host demos only).", example=True),
    S("federation", "max_retries", K.INT, 1, "Extra attempts when a peer is unreachable "
      "(inside its deadline).", 0, 5, example=0),
    S("federation", "default_deadline_ms", K.INT, 2000, "Deadline for `kms peer add` without "
      "--deadline-ms.", 1, 60_000, example=500),
    # [audit]
    S("audit", "max_bytes", K.INT, 64 * 1024 * 1024, "Rotate audit.log at this size; 0 = "
      "never (at least 4096 otherwise).", 0, 1 << 40, example=4096),
    S("audit", "keep", K.INT, 5, "Rotated logs kept.", 0, 1000, example=2),
    # [metrics]
    S("metrics", "listen", K.STRING, None, "HOST:PORT of /metrics.", example="127.0.0.1:9464"),
    S("metrics", "tls_cert", K.PATH, None, "Certificate for /metrics over HTTPS (PEM).",
      example="metrics.pem", companions={"tls_key": "metrics.key"}),
    S("metrics", "tls_key", K.PATH, None, "Its key (PEM).", example="metrics.key",
      companions={"tls_cert": "metrics.pem"}),
    S("metrics", "allow_plaintext_non_loopback", K.BOOL, False, "Accept plain HTTP off the "
      "loopback interface.", example=True),
    S("metrics", "tpk_max_age_s", K.INT, 90 * 86400, "Seconds a TPK may stay current before "
      "the KmsTpkNotRotated alert fires.", 60, TEN_YEARS_S, example=3600),
    # [tracing]
    S("tracing", "otlp_endpoint", K.STRING, None, "OTLP/HTTP collector URL.",
      example="http://127.0.0.1:4318"),
    S("tracing", "service_name", K.STRING, "kms", "service.name of the spans.",
      example="kms-a"),
    S("tracing", "record_identities", K.BOOL, False, "Endpoint identities and ticket ids in "
      "span attributes (off: none are recorded).", example=True),
    # [store]
    S("store", "backend", K.CHOICE, StoreBackend.SQLITE, "sqlite or postgresql (cluster "
      "mode, docs/cluster.md).", choices=_choices(StoreBackend),
      example=StoreBackend.POSTGRESQL, companions={"dsn": "postgresql://kms@db/kms"}),
    S("store", "dsn", K.STRING, None, "libpq connection string (required with postgresql; "
      "no password in it).", example="postgresql://kms@db/kms",
      companions={"backend": "postgresql"}),
    S("store", "password_env", K.STRING, None, "Environment variable holding the database "
      "password.", example="KMS_DB_PASSWORD"),
    S("store", "password_file", K.PATH, None, "File holding the database password.",
      example="db.pass"),
    S("store", "pool_size", K.INT, 4, "Database connections per worker.", 1, 256, example=2),
    S("store", "connect_timeout_s", K.INT, 3, "Database connect timeout.", 1, 60, example=10),
)

_BY_KEY = {(s.section, s.key): s for s in SETTINGS}


def setting(section: str, key: str) -> Setting:
    return _BY_KEY[(section, key)]


def default(section: str, key: str) -> object:
    """The declared default of ``[section] key`` (for the settings dataclasses)."""
    return _BY_KEY[(section, key)].default


def keys_of(section: str) -> tuple[str, ...]:
    return tuple(s.key for s in SETTINGS if s.section == section)


def settings_markdown() -> str:
    """The table of every setting, as in ``docs/configuration.md``."""
    rows = ["| section | key | type | default | meaning |", "|---|---|---|---|---|"]
    for sec in SECTIONS:
        for s in SETTINGS:
            if s.section != sec.name:
                continue
            shown = "-" if s.default is None else f"`{s.toml_default}`"
            rows.append(f"| `[{s.section}]` | `{s.key}` | {s.what} | {shown} | "
                        f"{s.doc.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
