"""``kms.toml``: the typed, validated KMS configuration.

Loading is split in two so that it can be tested without files: :func:`parse_config` is a
pure function from TOML text and the home path to a :class:`KmsConfig`; :func:`load_config`
only reads ``<home>/kms.toml``. :func:`render_config` writes the commented template that
``kms init`` installs; it is parsed back before it is written so that init can never produce
a configuration that the KMS then refuses to load.

Every validation failure is a :class:`ConfigError` whose message is one line naming the
section and key, e.g. ``kms.toml: [policy] forking: must be one of "allowed", ...``.
The PIN itself never appears in kms.toml: only where to read it from (``pin_env`` or
``pin_file``).
"""

from __future__ import annotations

import ipaddress
import json
import re
import textwrap
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hsm.uri import Pkcs11UriError, parse_uri
from kms.mikey.prf import PrfFunc
from kms.server.settings import (
    SECTIONS,
    SETTINGS,
    CoreCalls,
    Forking,
    IntermediateNodes,
    KeyTypeName,
    Kind,
    PrfName,
    Responders,
    RsaPadding,
    StoreBackend,
    keys_of,
    setting,
)

CONFIG_FILE = "kms.toml"

# The allowed values, from the enums the declarations use (kms.server.settings).
PRF_NAMES: dict[str, PrfFunc] = {p.value: p.func for p in PrfName}
KEY_TYPES = tuple(k.value for k in KeyTypeName)
FORKING_MODES = tuple(f.value for f in Forking)
RESPONDER_MODES = tuple(r.value for r in Responders)
PKE_PADDINGS = tuple(p.value for p in RsaPadding)
STORE_BACKENDS = tuple(b.value for b in StoreBackend)

# RFC 3986 scheme followed by ":"; used for the KMS id and for URI endpoint identities.
URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:\S+$")
# An environment variable name (pin_env, password_env).
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _d(section: str, key: str) -> Any:
    """The declared default of ``[section] key``."""
    return setting(section, key).default


class ConfigError(ValueError):
    """kms.toml is unreadable or invalid; the message is one line naming the bad key."""


@dataclass(frozen=True)
class TokenSettings:
    """``[token]``: which PKCS#11 token holds the KMS keys and how to log in."""

    module: str
    label: str | None = None
    serial: str | None = None
    pin_env: str | None = None
    pin_file: Path | None = None
    softhsm_conf: Path | None = None
    uri: str | None = None
    """The PKCS#11 URI (RFC 7512) the settings above were (partly) taken from, if any."""


@dataclass(frozen=True)
class ServerSettings:
    """``[server]``: the gRPC listener."""

    listen: str = _d("server", "listen")
    workers: int = _d("server", "workers")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    allow_plaintext_non_loopback: bool = _d("server", "allow_plaintext_non_loopback")
    # How many KMS core calls run at once in one worker; 0 = auto (see core_slots_for).
    core_concurrency: int = _d("server", "core_concurrency")
    # Where the core's calls run: inline on the event loop, or in threads (auto: see
    # kms.server.slots.core_threads_for).
    core_calls: CoreCalls = _d("server", "core_calls")  # noqa: RUF009 (an enum member)
    # Call admission per worker (kms.server.admission): how long a call may take to send
    # its request message, how many calls one peer address may hold, HTTP/2 streams per
    # connection.
    request_timeout_ms: int = _d("server", "request_timeout_ms")
    max_calls_per_peer: int = _d("server", "max_calls_per_peer")
    max_streams_per_connection: int = _d("server", "max_streams_per_connection")

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class PolicySettings:
    """``[policy]``: the KMS-wide ticket policy defaults."""

    # The weakest PRF accepted in message headers and granted in tickets: "hmac-sha-1"
    # accepts MIKEY-1 and PRF-HMAC-SHA-256, "hmac-sha-256" only the latter.
    prf: PrfName = _d("policy", "prf")  # noqa: RUF009 (an enum member)
    allowed_key_types: tuple[KeyTypeName, ...] = _d("policy", "allowed_key_types")
    max_lifetime_s: int = _d("policy", "max_lifetime_s")
    default_lifetime_s: int = _d("policy", "default_lifetime_s")
    forking: Forking = _d("policy", "forking")  # noqa: RUF009 (an enum member)
    reuse_allowed: bool = _d("policy", "reuse_allowed")
    responders: Responders = _d("policy", "responders")  # noqa: RUF009 (an enum member)
    intermediate_nodes: IntermediateNodes = _d("policy", "intermediate_nodes")  # noqa: RUF009
    timestamp_window_s: int = _d("policy", "timestamp_window_s")
    replay_cache_size: int = _d("policy", "replay_cache_size")  # 0 = auto (replay_capacity)
    rate_limit_per_s: int = _d("policy", "rate_limit_per_s")

    @property
    def prf_func(self) -> PrfFunc:
        return PrfName(self.prf).func


@dataclass(frozen=True)
class PkSettings:
    """``[pk]``: public-key (REQUEST_INIT_PK / RESOLVE_INIT_PK) settings."""

    ca_bundle: Path | None = None
    pke_padding: RsaPadding = _d("pk", "pke_padding")  # noqa: RUF009 (an enum member)
    # CRL file or folder (PEM/DER) checked for CERTi / CERTr and certificate peers.
    crl: Path | None = None

    @property
    def rsa_padding(self) -> RsaPadding:
        return RsaPadding(self.pke_padding)


@dataclass(frozen=True)
class FederationSettings:
    """``[federation]``: how this KMS calls peer KMSs (RFC 6043 9) to resolve their tickets.

    Mutual TLS by default: the client certificate is ``client_cert``/``client_key``, else the
    server's own ``[server] tls_cert``/``tls_key``; the peer's server certificate is checked
    against the CA given with ``kms peer add --ca``. Plaintext only to loopback peers
    registered without a CA, and only with ``allow_plaintext = true`` (tests, one-host demos).
    """

    client_cert: Path | None = None
    client_key: Path | None = None
    allow_plaintext: bool = _d("federation", "allow_plaintext")
    max_retries: int = _d("federation", "max_retries")  # on UNAVAILABLE only
    default_deadline_ms: int = _d("federation", "default_deadline_ms")


@dataclass(frozen=True)
class StoreSettings:
    """``[store]``: where the shared state lives. ``sqlite`` (the default): files in the home,
    one host. ``postgresql``: a database shared by every replica of a cluster (``dsn``; its
    password from ``password_file`` / ``password_env`` / PGPASSFILE, never in kms.toml)."""

    backend: StoreBackend = _d("store", "backend")  # noqa: RUF009 (an enum member)
    dsn: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    pool_size: int = _d("store", "pool_size")
    connect_timeout_s: int = _d("store", "connect_timeout_s")


@dataclass(frozen=True)
class AuditSettings:
    """``[audit]``: the audit log's size-based rotation (kms.store.audit)."""

    max_bytes: int = _d("audit", "max_bytes")  # 0: never rotate (the system's logrotate does)
    keep: int = _d("audit", "keep")


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics]``: the Prometheus ``/metrics`` listener (off unless ``listen`` is set).

    Plain HTTP only on loopback unless ``tls_cert``/``tls_key`` are set or
    ``allow_plaintext_non_loopback = true``. ``tpk_max_age_s``: how long a TPK may stay
    current before the ``KmsTpkNotRotated`` alert fires (exported as a gauge).
    """

    listen: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_plaintext_non_loopback: bool = _d("metrics", "allow_plaintext_non_loopback")
    tpk_max_age_s: int = _d("metrics", "tpk_max_age_s")

    @property
    def enabled(self) -> bool:
        return self.listen is not None


@dataclass(frozen=True)
class TracingSettings:
    """``[tracing]``: spans exported over OTLP/HTTP JSON (off unless ``otlp_endpoint`` is
    set). ``record_identities``: endpoint identities and ticket ids in span attributes."""

    otlp_endpoint: str | None = None
    service_name: str = _d("tracing", "service_name")
    record_identities: bool = _d("tracing", "record_identities")

    @property
    def enabled(self) -> bool:
        return self.otlp_endpoint is not None


@dataclass(frozen=True)
class KmsConfig:
    """The whole of kms.toml; paths are absolute (relative ones resolved against ``home``)."""

    home: Path
    kms_id: str
    token: TokenSettings
    server: ServerSettings = field(default_factory=ServerSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    pk: PkSettings = field(default_factory=PkSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    store: StoreSettings = field(default_factory=StoreSettings)

    @property
    def kms_id_bytes(self) -> bytes:
        """The KMS identity as sent in IDRkms (UTF-8, compared byte for byte)."""
        return self.kms_id.encode("utf-8")


# ------------------------------------------------------------------------------------------
# validation helpers


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError if malformed."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", listen)
    if not m:
        raise ValueError("expected HOST:PORT or [IPV6]:PORT")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError("port must be 1..65535")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a DNS name other than localhost may resolve anywhere


T = TypeVar("T")


class _Section:
    """Reads typed values out of one TOML table and reports the first problem by name."""

    def __init__(self, name: str, doc: Mapping[str, Any], home: Path) -> None:
        self.name = name
        table = doc.get(name)
        allowed = keys_of(name)
        self.home = home
        if table is None:
            table = {}
        if not isinstance(table, Mapping):
            raise ConfigError(f"{CONFIG_FILE}: [{name}] must be a table")
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            # Unknown keys are almost always typos of a real key: refuse instead of ignoring.
            raise ConfigError(f"{CONFIG_FILE}: [{name}] {unknown[0]}: unknown key")
        self.table: Mapping[str, Any] = table

    def error(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{CONFIG_FILE}: [{self.name}] {key}: {msg}")

    def _get(self, key: str, default: T, check: Callable[[Any], bool], what: str) -> Any:
        if key not in self.table:
            return default
        value = self.table[key]
        if not check(value):
            raise self.error(key, f"must be {what}, got {_show(value)}")
        return value

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self._get(key, default, lambda v: isinstance(v, str) and v != "", "a string")
        return value  # type: ignore[no-any-return]

    def required_string(self, key: str) -> str:
        value = self.string(key)
        if value is None:
            raise self.error(key, "is required")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self._get(key, default, lambda v: isinstance(v, bool), "true or false"))

    def integer(self, key: str, default: int, minimum: int, maximum: int) -> int:
        # bool is an int subclass in Python: refuse `workers = true` explicitly.
        value = self._get(
            key,
            default,
            lambda v: isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= maximum,
            f"an integer in {minimum}..{maximum}",
        )
        return int(value)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        what = "one of " + ", ".join(json.dumps(c) for c in choices)
        return str(self._get(key, default, lambda v: v in choices, what))

    def path(self, key: str) -> Path | None:
        value = self.string(key)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.home / p

    def value(self, key: str) -> Any:
        """``key`` read as declared in kms.server.settings (type, bounds, default)."""
        s = setting(self.name, key)
        if s.kind is Kind.STRING:
            return self.string(key, s.default)
        if s.kind is Kind.PATH:
            return self.path(key)
        if s.kind is Kind.BOOL:
            return self.boolean(key, bool(s.default))
        if s.kind is Kind.INT:
            return self.integer(key, int(s.default), s.minimum, s.maximum)
        if s.kind is Kind.CHOICE:
            return type(s.default)(self.choice(key, str(s.default), s.choices))
        raise AssertionError(f"[{self.name}] {key}: {s.kind} is read by its section")


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------------------------
# parsing


def parse_config(text: str, home: Path) -> KmsConfig:
    """Validate kms.toml text; relative paths are resolved against ``home`` (no file I/O)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{CONFIG_FILE}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"kms", "token", "server", "policy", "pk", "federation",
                                "audit", "metrics", "tracing", "store"})
    if unknown:
        raise ConfigError(f"{CONFIG_FILE}: [{unknown[0]}]: unknown section")

    kms = _Section("kms", doc, home)
    kms_id = kms.required_string("id")
    if not URI_RE.match(kms_id):
        raise kms.error("id", f"must be a URI such as \"kms:kms.example.org\", got {_show(kms_id)}")

    token = _parse_token(doc, home)
    server = _parse_server(doc, home)
    policy = _parse_policy(doc, home)

    pk = _Section("pk", doc, home)
    pk_settings = PkSettings(
        ca_bundle=pk.value("ca_bundle"),
        pke_padding=pk.value("pke_padding"),
        crl=pk.value("crl"),
    )
    return KmsConfig(
        home=home,
        kms_id=kms_id,
        token=token,
        server=server,
        policy=policy,
        pk=pk_settings,
        federation=_parse_federation(doc, home),
        audit=_parse_audit(doc, home),
        metrics=_parse_metrics(doc, home),
        tracing=_parse_tracing(doc, home),
        store=_parse_store(doc, home),
    )


def _parse_audit(doc: Mapping[str, Any], home: Path) -> AuditSettings:
    sec = _Section("audit", doc, home)
    max_bytes = sec.value("max_bytes")
    if 0 < max_bytes < 4096:
        raise sec.error("max_bytes", f"must be 0 (no rotation) or at least 4096, got {max_bytes}")
    return AuditSettings(max_bytes=max_bytes, keep=sec.value("keep"))


def _parse_tracing(doc: Mapping[str, Any], home: Path) -> TracingSettings:
    sec = _Section("tracing", doc, home)
    endpoint = sec.value("otlp_endpoint")
    if endpoint is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", endpoint):
        raise sec.error("otlp_endpoint", f"must be an http:// or https:// URL, got "
                                         f"{_show(endpoint)}")
    return TracingSettings(
        otlp_endpoint=endpoint,
        service_name=sec.value("service_name"),
        record_identities=sec.value("record_identities"),
    )


def check_plaintext_listen(
    listen: str, tls: bool, allow_plaintext: bool, section: str, what: str
) -> None:
    """``HOST:PORT`` to listen on without TLS only on loopback, unless allowed: plaintext
    off the loopback interface exposes tickets, metadata or metrics to the network, so it
    has to be asked for explicitly. ValueError with the reason (the caller names the
    setting); ``section``: where tls_cert / allow_plaintext_non_loopback are set, "" for
    [server]; ``what``: the plaintext protocol."""
    host, _port = split_listen(listen)
    if not tls and not is_loopback(host) and not allow_plaintext:
        where = f" in {section}" if section else ""
        has = f"{section} has no tls_cert/tls_key" if section else "no tls_cert/tls_key is set"
        raise ValueError(
            f"{listen} is not a loopback address and {has} "
            f"(set allow_plaintext_non_loopback = true{where} to accept {what})"
        )


def check_metrics_listen(listen: str, tls: bool, allow_plaintext: bool) -> None:
    """``HOST:PORT`` for ``/metrics``; plain HTTP off loopback only when allowed."""
    check_plaintext_listen(listen, tls, allow_plaintext, "[metrics]", "plain HTTP")


def _check_pair(sec: _Section, first: str, second: str, a: object, b: object) -> None:
    """Two settings that go together (a certificate and its key): both or neither."""
    if (a is None) != (b is None):
        missing = second if b is None else first
        raise sec.error(missing, f"{first} and {second} must be given together")


def _parse_metrics(doc: Mapping[str, Any], home: Path) -> MetricsSettings:
    sec = _Section("metrics", doc, home)
    settings = MetricsSettings(
        listen=sec.value("listen"),
        tls_cert=sec.value("tls_cert"),
        tls_key=sec.value("tls_key"),
        allow_plaintext_non_loopback=sec.value("allow_plaintext_non_loopback"),
        tpk_max_age_s=sec.value("tpk_max_age_s"),
    )
    _check_pair(sec, "tls_cert", "tls_key", settings.tls_cert, settings.tls_key)
    if settings.listen is not None:
        try:
            check_metrics_listen(
                settings.listen, settings.tls_cert is not None,
                settings.allow_plaintext_non_loopback,
            )
        except ValueError as exc:
            raise sec.error("listen", str(exc)) from None
    return settings


def _parse_store(doc: Mapping[str, Any], home: Path) -> StoreSettings:
    sec = _Section("store", doc, home)
    backend = sec.value("backend")
    dsn = sec.value("dsn")
    password_env = sec.value("password_env")
    password_file = sec.value("password_file")
    if backend == "postgresql":
        if dsn is None:
            raise sec.error("dsn", 'is required with backend = "postgresql"')
        from kms.store.pg import check_dsn  # psycopg only when PostgreSQL is configured

        problem = check_dsn(dsn)
        if problem:
            raise sec.error("dsn", problem)  # never echoes the DSN (it may hold a password)
    if password_env is not None and password_file is not None:
        raise sec.error("password_env", "give either password_env or password_file, not both")
    if password_env is not None and not ENV_NAME_RE.fullmatch(password_env):
        raise sec.error("password_env", "must be an environment variable name")
    return StoreSettings(
        backend=backend,
        dsn=dsn,
        password_env=password_env,
        password_file=password_file,
        pool_size=sec.value("pool_size"),
        connect_timeout_s=sec.value("connect_timeout_s"),
    )


def render_store_section(dsn: str, *, password_env: str | None = None,
                         password_file: str | None = None) -> str:
    """The ``[store]`` section `kms store migrate` writes (cluster mode)."""
    lines = [
        "[store]",
        "# Shared state of a cluster of replicas (kms store migrate). Never a password here:",
        "# password_file, password_env, or libpq's PGPASSFILE.",
        'backend = "postgresql"',
        f"dsn = {_toml_str(dsn)}",
    ]
    if password_env is not None:
        lines.append(f"password_env = {_toml_str(password_env)}")
    if password_file is not None:
        lines.append(f"password_file = {_toml_str(password_file)}")
    return "\n".join(lines) + "\n"


def _parse_federation(doc: Mapping[str, Any], home: Path) -> FederationSettings:
    sec = _Section("federation", doc, home)
    settings = FederationSettings(
        client_cert=sec.value("client_cert"),
        client_key=sec.value("client_key"),
        allow_plaintext=sec.value("allow_plaintext"),
        max_retries=sec.value("max_retries"),
        default_deadline_ms=sec.value("default_deadline_ms"),
    )
    _check_pair(sec, "client_cert", "client_key", settings.client_cert, settings.client_key)
    return settings


def _parse_token(doc: Mapping[str, Any], home: Path) -> TokenSettings:
    if "token" not in doc:
        raise ConfigError(f"{CONFIG_FILE}: [token]: section is required")
    sec = _Section("token", doc, home)
    from_uri = _token_from_uri(sec)
    module = _merge_token_key(sec, "module", sec.value("module"), from_uri.get("module"))
    if module is None:
        raise sec.error("module", "is required (or give module-path in uri)")
    label = _merge_token_key(sec, "label", sec.value("label"), from_uri.get("label"))
    serial = _merge_token_key(sec, "serial", sec.value("serial"), from_uri.get("serial"))
    if label is None and serial is None:
        raise sec.error("label", "is required (or give serial)")
    pin_env = sec.value("pin_env")
    pin_file = sec.value("pin_file")
    if from_uri.get("pin_env") is not None or from_uri.get("pin_file") is not None:
        uri_pin_file = from_uri.get("pin_file")
        uri_pin = (from_uri.get("pin_env"), None if uri_pin_file is None else Path(uri_pin_file))
        if (pin_env is not None or pin_file is not None) and (pin_env, pin_file) != uri_pin:
            raise sec.error("uri", "pin-source differs from pin_env / pin_file")
        pin_env, pin_file = uri_pin
    if pin_env is None and pin_file is None:
        raise sec.error("pin_file", "is required (or give pin_env)")
    if pin_env is not None and pin_file is not None:
        raise sec.error("pin_env", "give either pin_env or pin_file, not both")
    if pin_env is not None and not ENV_NAME_RE.fullmatch(pin_env):
        raise sec.error("pin_env", f"must be an environment variable name, got {_show(pin_env)}")
    return TokenSettings(
        module=module,
        label=label,
        serial=serial,
        pin_env=pin_env,
        pin_file=pin_file,
        softhsm_conf=sec.value("softhsm_conf"),
        uri=sec.value("uri"),
    )


def _token_from_uri(sec: _Section) -> dict[str, str | None]:
    """``[token] uri``: a PKCS#11 URI (RFC 7512) naming the token, its module and PIN source,
    beside (or instead of) module / label / serial / pin_env / pin_file."""
    text = sec.value("uri")
    if text is None:
        return {}
    try:
        uri = parse_uri(text)
        if uri.object_label is not None or uri.object_type is not None:
            raise Pkcs11UriError("names a key (object= / type=); [token] uri names a token")
        pin_env, pin_file = uri.pin_location()
        module = uri.resolve_module()
    except Pkcs11UriError as exc:
        raise sec.error("uri", str(exc)) from None
    return {"module": module, "label": uri.token_label, "serial": uri.token_serial,
            "pin_env": pin_env, "pin_file": pin_file}


def _merge_token_key(sec: _Section, key: str, direct: str | None,
                     from_uri: str | None) -> str | None:
    if direct is not None and from_uri is not None and direct != from_uri:
        raise sec.error(key, f"{_show(direct)} differs from the uri's {_show(from_uri)}")
    return direct if direct is not None else from_uri


def _parse_server(doc: Mapping[str, Any], home: Path) -> ServerSettings:
    sec = _Section("server", doc, home)
    listen = sec.value("listen")
    assert listen is not None
    try:
        split_listen(listen)
    except ValueError as exc:
        raise sec.error("listen", f"{exc}, got {_show(listen)}") from None
    settings = ServerSettings(
        listen=listen,
        workers=sec.value("workers"),
        tls_cert=sec.value("tls_cert"),
        tls_key=sec.value("tls_key"),
        tls_client_ca=sec.value("tls_client_ca"),
        allow_plaintext_non_loopback=sec.value("allow_plaintext_non_loopback"),
        core_concurrency=sec.value("core_concurrency"),
        core_calls=sec.value("core_calls"),
        request_timeout_ms=sec.value("request_timeout_ms"),
        max_calls_per_peer=sec.value("max_calls_per_peer"),
        max_streams_per_connection=sec.value("max_streams_per_connection"),
    )
    _check_pair(sec, "tls_cert", "tls_key", settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise sec.error("tls_client_ca", "needs tls_cert and tls_key")
    try:
        check_plaintext_listen(
            listen, settings.tls_cert is not None, settings.allow_plaintext_non_loopback,
            "", "plaintext",
        )
    except ValueError as exc:
        raise sec.error("listen", str(exc)) from None
    return settings


def _parse_policy(doc: Mapping[str, Any], home: Path) -> PolicySettings:
    sec = _Section("policy", doc, home)
    key_types = sec.table.get("allowed_key_types", list(KEY_TYPES))
    if (
        not isinstance(key_types, list)
        or not key_types
        or any(k not in KEY_TYPES for k in key_types)
        or len(set(key_types)) != len(key_types)
    ):
        raise sec.error(
            "allowed_key_types",
            f"must be a non-empty list of distinct values from {json.dumps(list(KEY_TYPES))}, "
            f"got {_show(key_types)}",
        )
    policy = PolicySettings(
        prf=sec.value("prf"),
        allowed_key_types=tuple(KeyTypeName(k) for k in key_types),
        max_lifetime_s=sec.value("max_lifetime_s"),
        default_lifetime_s=sec.value("default_lifetime_s"),
        forking=sec.value("forking"),
        reuse_allowed=sec.value("reuse_allowed"),
        responders=sec.value("responders"),
        intermediate_nodes=sec.value("intermediate_nodes"),
        timestamp_window_s=sec.value("timestamp_window_s"),
        replay_cache_size=sec.value("replay_cache_size"),
        rate_limit_per_s=sec.value("rate_limit_per_s"),
    )
    if policy.default_lifetime_s > policy.max_lifetime_s:
        raise sec.error(
            "default_lifetime_s",
            f"must not exceed max_lifetime_s ({policy.default_lifetime_s} > "
            f"{policy.max_lifetime_s})",
        )
    return policy


def load_config(home: Path) -> KmsConfig:
    """Read and validate ``<home>/kms.toml`` (home made absolute first)."""
    home = home.absolute()
    path = home / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_config(text, home)


# ------------------------------------------------------------------------------------------
# the template written by `kms init`


def _toml_str(value: str) -> str:
    # JSON string escapes (\", \\, \n, \uXXXX) are all valid TOML basic-string escapes.
    return json.dumps(value, ensure_ascii=False)


def render_config(
    kms_id: str,
    *,
    module: str,
    token_label: str | None,
    token_serial: str | None = None,
    pin_env: str | None = None,
    pin_file: str | None = None,
    softhsm_conf: str | None = None,
    token_uri: str | None = None,
) -> str:
    """The kms.toml text written by ``kms init``: every setting present, defaults shown."""

    def opt(key: str, value: str | None, comment: str) -> str:
        if value is None:
            return f"# {key} = ...  # {comment}"
        return f"{key} = {_toml_str(value)}"

    lines = [
        "# MIKEY-TICKET KMS configuration (written by `kms init`).",
        "# Relative paths are resolved against the KMS home (the folder of this file).",
        "",
        "[kms]",
        "# The KMS identity, sent as IDRkms and used as the certificate's subjectAltName URI.",
        f"id = {_toml_str(kms_id)}",
        "",
        "[token]",
        "# PKCS#11 module and token holding every long-term key (PSKs, TPKs, RSA keys).",
        f"module = {_toml_str(module)}",
        opt("label", token_label, "token label"),
        opt("serial", token_serial, "token serial number (optional)"),
        "# Where the user PIN comes from: exactly one of pin_env / pin_file. Never the PIN.",
        opt("pin_env", pin_env, "environment variable holding the PIN"),
        opt("pin_file", pin_file, "file holding the PIN (mode 0600)"),
        opt("softhsm_conf", softhsm_conf, "SOFTHSM2_CONF for a SoftHSM token"),
        "# Or a PKCS#11 URI (RFC 7512) for the same, e.g. pkcs11:token=kms?module-path=",
        "# /usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/kms/pin (docs/hsm.md).",
        opt("uri", token_uri, "PKCS#11 URI of the token"),
        "",
    ]
    for sec in SECTIONS:
        if sec.in_template and not sec.required:
            lines += _render_section(sec.name, sec.doc)
    return "\n".join(lines)


def _render_section(name: str, doc: str) -> list[str]:
    """One section of the template, from its declarations: every key with its doc; a key
    without a default is shown commented out with an example value."""
    lines = [f"[{name}]", *_comment(doc)]
    for s in SETTINGS:
        if s.section != name:
            continue
        lines += _comment(s.doc)
        if s.default is None:
            lines.append(f"# {s.key} = {s.toml_example}")
        else:
            lines.append(f"{s.key} = {s.toml_default}")
    return [*lines, ""]


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, 90)]
