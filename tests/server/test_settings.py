"""Every kms.toml setting is declared once (kms.server.settings) and every key does something.

Table-driven over the declarations: for each key, its declared example (a non-default value)
changes the parsed config, and changes what reaches the component that uses the key (the
core's KmsPolicy, the serve plan, call admission limits, core slots, the replay cache, the rate
limiter, the federation resolver, the /metrics plan, the token operations). The keys whose
component needs a live token or database to build are listed in PARSED_ONLY with the
component that reads the field; the test fails if a key is neither probed nor listed.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kms.core.policy import KmsPolicy
from kms.mikey.constants import IdType
from kms.server.admission import limits_for
from kms.server.compose import kms_policy, replay_capacity
from kms.server.config import (
    CONFIG_FILE,
    ConfigError,
    KmsConfig,
    PolicySettings,
    parse_config,
    render_config,
)
from kms.server.federation import GrpcPeerResolver
from kms.server.serve import ServeError, make_plan, metrics_plan
from kms.server.settings import SECTIONS, SETTINGS, Setting, settings_markdown
from kms.server.slots import core_slots_for, core_threads_for
from kms.server.stores import SqliteStores
from kms.server.token_needs import required_operations
from tests.server.tls_pki import Ca

ROOT = Path(__file__).resolve().parents[2]
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
BASE: dict[str, dict[str, Any]] = {
    "kms": {"id": "sip:kms.example.org"},
    "token": {"module": SOFTHSM, "label": "base", "pin_file": "token/base-pin"},
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _text(doc: dict[str, dict[str, Any]]) -> str:
    return "".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())
        for name, table in doc.items()
    )


def _doc_with(s: Setting) -> dict[str, dict[str, Any]]:
    doc = {name: dict(table) for name, table in BASE.items()}
    table = doc.setdefault(s.section, {})
    table.update(s.companions)
    table[s.key] = s.example
    if (s.section, s.key) == ("token", "pin_env"):
        del table["pin_file"]  # exactly one PIN source
    return doc


_CA = Ca("settings test CA")
_TLS_FILES: dict[str, bytes] = {"clients-ca.pem": _CA.pem}
for _cert, _key in (("c.pem", "k.pem"), ("server.pem", "server.key"),
                    ("federation.pem", "federation.key")):
    _leaf = _CA.issue(_cert)
    _TLS_FILES[_cert], _TLS_FILES[_key] = _leaf.cert_pem, _leaf.key_pem


def _write(home: Path, doc: dict[str, dict[str, Any]]) -> KmsConfig:
    home.mkdir(parents=True, exist_ok=True)
    # Real certificates: the server and the federation client validate them at start.
    for name, data in _TLS_FILES.items():
        (home / name).write_bytes(data)
    (home / CONFIG_FILE).write_text(_text(doc))
    return parse_config(_text(doc), home)


def _plan(home: Path, listen: str | None = None) -> Any:
    try:
        p = make_plan(home, listen=listen, workers=None, threads=8, grace=1.0, log_level="INFO")
    except ServeError:
        return "refused"
    return (p.listen, p.workers, p.tls)


def _plain_metrics(c: KmsConfig) -> str:
    try:
        metrics_plan(c, "0.0.0.0:9464")
    except ServeError:
        return "refused"
    return "served"


def _resolver(c: KmsConfig) -> tuple[Any, ...]:
    r = GrpcPeerResolver.from_config(c, c.home / "registry.sqlite3")
    return (r._client, r._allow_plaintext, r._max_retries)


Probe = Callable[[KmsConfig, Path], Any]
PROBES: dict[tuple[str, str], Probe] = {
    ("kms", "id"): lambda c, h: kms_policy(c).kms_id,
    ("token", "module"): lambda c, h: core_slots_for(c),  # SoftHSM: 1 slot, others: 8
    ("server", "listen"): lambda c, h: _plan(h),
    ("server", "workers"): lambda c, h: _plan(h),
    ("server", "tls_cert"): lambda c, h: _plan(h),
    ("server", "tls_key"): lambda c, h: _plan(h),
    ("server", "tls_client_ca"): lambda c, h: _plan(h),
    ("server", "allow_plaintext_non_loopback"): lambda c, h: _plan(h, "0.0.0.0:50051"),
    ("server", "core_concurrency"): lambda c, h: core_slots_for(c),
    ("server", "core_calls"): lambda c, h: core_threads_for(c, 1, 128),
    ("server", "request_timeout_ms"): lambda c, h: limits_for(c.server, 256),
    ("server", "max_calls_per_peer"): lambda c, h: limits_for(c.server, 256),
    ("server", "max_streams_per_connection"): lambda c, h: limits_for(c.server, 256),
    ("policy", "replay_cache_size"): lambda c, h: replay_capacity(c),
    ("policy", "rate_limit_per_s"): lambda c, h: SqliteStores(c).rate_limiter().rate,  # type: ignore[attr-defined]
    ("pk", "pke_padding"): lambda c, h: required_operations(c),
    ("federation", "client_cert"): lambda c, h: _resolver(c),
    ("federation", "client_key"): lambda c, h: _resolver(c),
    ("federation", "allow_plaintext"): lambda c, h: _resolver(c),
    ("federation", "max_retries"): lambda c, h: _resolver(c),
    ("metrics", "listen"): lambda c, h: metrics_plan(c, None),
    ("metrics", "tls_cert"): lambda c, h: metrics_plan(c, "127.0.0.1:9464"),
    ("metrics", "tls_key"): lambda c, h: metrics_plan(c, "127.0.0.1:9464"),
    ("metrics", "allow_plaintext_non_loopback"): lambda c, h: _plain_metrics(c),
}
for _key in ("prf", "allowed_key_types", "max_lifetime_s", "default_lifetime_s", "forking",
             "reuse_allowed", "responders", "timestamp_window_s", "intermediate_nodes"):
    PROBES[("policy", _key)] = lambda c, h: kms_policy(c)

# Keys whose component needs a logged-in token, a database or a running server to be built;
# the field checked below is exactly what that component reads.
PARSED_ONLY = {
    ("token", "label"): "hsm.TokenConfig (Home.token_config)",
    ("token", "serial"): "hsm.TokenConfig (Home.token_config)",
    ("token", "pin_env"): "hsm.read_pin (Home.token_config)",
    ("token", "pin_file"): "hsm.read_pin (Home.token_config)",
    ("token", "softhsm_conf"): "hsm.TokenConfig (Home.token_config)",
    ("token", "uri"): "the token settings it fills in (tests/hsm/test_uri.py)",
    ("pk", "ca_bundle"): "CertificateAuthenticator (compose.build_handler)",
    ("pk", "crl"): "CrlStore (compose.build_handler)",
    ("federation", "default_deadline_ms"): "kms peer add",
    ("audit", "max_bytes"): "JsonLinesAuditSink (compose.build_handler)",
    ("audit", "keep"): "JsonLinesAuditSink (compose.build_handler)",
    ("metrics", "tpk_max_age_s"): "the kms_tpk_max_age_seconds gauge",
    ("tracing", "otlp_endpoint"): "OtlpJsonExporter (observe.ObservedProcess)",
    ("tracing", "service_name"): "OtlpJsonExporter (observe.ObservedProcess)",
    ("tracing", "record_identities"): "Tracer (observe.ObservedProcess)",
    ("store", "backend"): "open_stores (kms.server.stores)",
    ("store", "dsn"): "PgSettings (kms.server.stores)",
    ("store", "password_env"): "PgSettings (kms.server.stores)",
    ("store", "password_file"): "PgSettings (kms.server.stores)",
    ("store", "pool_size"): "PgSettings (kms.server.stores)",
    ("store", "connect_timeout_s"): "PgSettings (kms.server.stores)",
}

IDS = [f"{s.section}.{s.key}" for s in SETTINGS]


def _field(c: KmsConfig, s: Setting) -> Any:
    if s.section == "kms":
        return c.kms_id
    return getattr(getattr(c, s.section), s.key)


@pytest.mark.parametrize("s", SETTINGS, ids=IDS)
def test_every_key_changes_the_parsed_config_and_its_component(
    s: Setting, tmp_path: Path
) -> None:
    assert s.example is not None and s.example != s.default, "declare a non-default example"
    base = _write(tmp_path / "default", BASE)
    changed = _write(tmp_path / "changed", _doc_with(s))
    expected = s.example
    if s.kind.value == "path":
        expected = tmp_path / "changed" / str(s.example)
    elif s.kind.value == "list":
        expected = tuple(s.example)
    assert _field(changed, s) == expected
    assert _field(base, s) != _field(changed, s)
    probe = PROBES.get((s.section, s.key))
    assert (probe is None) != ((s.section, s.key) not in PARSED_ONLY), (
        "each key is probed through its component or listed in PARSED_ONLY, not both"
    )
    if probe is not None:
        assert probe(base, tmp_path / "default") != probe(changed, tmp_path / "changed")


def test_declarations_cover_every_settings_field() -> None:
    """The settings dataclasses hold exactly the declared keys, with the declared defaults."""
    declared = {(s.section, s.key) for s in SETTINGS}
    fields: set[tuple[str, str]] = {("kms", "id")}
    sections = {f.name for f in dataclasses.fields(KmsConfig)} - {"home", "kms_id"}
    assert sections | {"kms"} == {sec.name for sec in SECTIONS}
    defaults = parse_config(_text(BASE), Path("/srv/kms"))
    for name in ("server", "policy", "pk", "federation", "audit", "metrics", "tracing",
                 "store", "token"):
        section = getattr(defaults, name)
        for f in dataclasses.fields(section):
            fields.add((name, f.name))
            if (name, f.name) in declared and name != "token":
                assert getattr(section, f.name) == _declared(name, f.name), (name, f.name)
    assert fields == declared


def _declared(section: str, key: str) -> Any:
    d = next(s for s in SETTINGS if (s.section, s.key) == (section, key)).default
    return tuple(d) if isinstance(d, tuple) else d


def test_core_policy_defaults_are_the_config_defaults() -> None:
    """kms.toml without [policy] gives the core exactly KmsPolicy's own defaults."""
    c = parse_config(_text(BASE), Path("/srv/kms"))
    assert kms_policy(c) == KmsPolicy(kms_id=b"sip:kms.example.org", kms_id_type=IdType.URI)


def test_template_is_every_declared_key_with_its_default() -> None:
    text = render_config("sip:kms.example.org", module=SOFTHSM, token_label="kms",
                         pin_file="token/pin")
    doc = tomllib.loads(text)
    for s in SETTINGS:
        sec = next(x for x in SECTIONS if x.name == s.section)
        if not sec.in_template or sec.required:
            continue
        line = f"{s.key} = {s.toml_default}" if s.default is not None else (
            f"# {s.key} = {s.toml_example}"
        )
        assert line in text.splitlines(), line
        if s.default is not None:
            assert doc[s.section][s.key] == _toml_loads(s.toml_default)
    assert parse_config(text, Path("/srv/kms")).policy == PolicySettings()
    assert "[store]" not in text  # written by `kms store migrate`


def _toml_loads(value: str) -> Any:
    return tomllib.loads(f"v = {value}")["v"]


def test_docs_table_is_generated_from_the_declarations() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    begin, end = "<!-- settings:begin -->\n", "<!-- settings:end -->"
    assert begin in doc and end in doc
    table = doc.split(begin, 1)[1].split(end, 1)[0]
    assert table == settings_markdown(), (
        "docs/configuration.md is stale: regenerate with "
        "python -c 'from kms.server.settings import settings_markdown as m; print(m())'"
    )


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.kind.value in ("choice", "list")],
                         ids=lambda s: f"{s.section}.{s.key}")
def test_enum_settings_refuse_other_values(s: Setting) -> None:
    doc = _doc_with(s)
    doc[s.section][s.key] = ["nope"] if s.kind.value == "list" else "nope"
    with pytest.raises(ConfigError, match=rf"\[{s.section}\] {s.key}: must be"):
        parse_config(_text(doc), Path("/srv/kms"))
