"""PKCS#11 URIs (RFC 7512): parsing, refusals, writing, and ``[token] uri`` in kms.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsm.provision import DEFAULT_OPENCRYPTOKI_MODULE, DEFAULT_SOFTHSM_MODULE
from hsm.uri import Pkcs11UriError, find_module, key_uri, parse_uri, token_uri
from kms.server.config import ConfigError, parse_config, render_config

SOFTHSM = DEFAULT_SOFTHSM_MODULE


def test_rfc7512_examples_parse() -> None:
    # RFC 7512 section 3 examples (the ones naming tokens and objects).
    u = parse_uri("pkcs11:object=my-pubkey;type=public")
    assert (u.object_label, u.object_type, u.token_label) == ("my-pubkey", "public", None)
    u = parse_uri("pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;"
                  "manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;"
                  "id=%69%95%3E%5C%F4%BD%EC%91;serial=")
    assert u.token_label == "The Software PKCS#11 Softtoken"
    assert u.path["manufacturer"] == b"Snake Oil, Inc."
    assert u.path["id"] == bytes.fromhex("69953e5cf4bdec91")
    assert u.token_serial == ""
    u = parse_uri("pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;"
                  "type=cert")
    assert u.token_label == "A name with a substring %;"
    u = parse_uri("pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc."
                  "?pin-source=file:/etc/token")
    assert u.pin_location() == (None, "/etc/token")
    u = parse_uri("pkcs11:object=my-sign-key;type=private?module-name=mypkcs11")
    assert u.module_name == "mypkcs11"
    u = parse_uri("pkcs11:object=my-sign-key;type=private"
                  "?module-path=/mnt/libmypkcs11.so.1")
    assert u.resolve_module() == "/mnt/libmypkcs11.so.1"
    assert parse_uri("pkcs11:").path == {}


def test_pin_sources() -> None:
    assert parse_uri("pkcs11:token=k?pin-source=file:///etc/kms/pin").pin_location() == (
        None, "/etc/kms/pin")
    assert parse_uri("pkcs11:token=k?pin-source=file://localhost/p").pin_location() == (None, "/p")
    assert parse_uri("pkcs11:token=k?pin-source=%2Fetc%2Fpin").pin_location() == (None, "/etc/pin")
    assert parse_uri("pkcs11:token=k?pin-source=env:KMS_PIN").pin_location() == ("KMS_PIN", None)
    assert parse_uri("pkcs11:token=k").pin_location() == (None, None)


@pytest.mark.parametrize(("uri", "message"), [
    ("token=kms", "starts with 'pkcs11:'"),
    ("pkcs11:token=kms?pin-value=1234", "pin-value is refused"),
    ("pkcs11:token=a;token=b", "'token' appears twice"),
    ("pkcs11:tokn=kms", "unknown PKCS#11 URI path attribute 'tokn'"),
    ("pkcs11:token=kms?module=x", "unknown PKCS#11 URI query attribute 'module'"),
    ("pkcs11:token", "has no '='"),
    ("pkcs11:token=a%2", "bad percent-encoding"),
    ("pkcs11:token=a%ff", "not UTF-8"),
    ("pkcs11:token=a b", "whitespace"),
    ("pkcs11:object=x;type=key", "type must be one of"),
    ("pkcs11:token=k?module-path=lib.so", "absolute path"),
    ("pkcs11:token=k?module-path=/a.so&module-name=b", "not both"),
    ("pkcs11:token=k?pin-source=https://x/pin", "pin-source must be"),
    ("pkcs11:token=k?pin-source=file://other/pin", "local file"),
    ("pkcs11:token=k?pin-source=env:1X", "environment variable name"),
])
def test_bad_uris_are_one_line_errors_without_secrets(uri: str, message: str) -> None:
    with pytest.raises(Pkcs11UriError, match=message) as ei:
        parse_uri(uri)
    assert "\n" not in str(ei.value)
    assert "1234" not in str(ei.value)


def test_vendor_attributes_are_kept() -> None:
    assert parse_uri("pkcs11:token=k;x-vendor=1?x-q=2").path["x-vendor"] == b"1"


def test_written_uris_parse_back() -> None:
    text = token_uri("kms;1 %", "0a1b", module="/usr/lib/my module.so",
                     pin_file="/etc/kms/pin file")
    u = parse_uri(text)
    assert (u.token_label, u.token_serial, u.module_path) == ("kms;1 %", "0a1b",
                                                              "/usr/lib/my module.so")
    assert u.pin_location() == (None, "/etc/kms/pin file")
    assert " " not in text
    k = key_uri("kms", "psk/sip:alice@example.org", "secret-key")
    assert k == "pkcs11:token=kms;object=psk%2Fsip:alice@example.org;type=secret-key"
    assert parse_uri(k).object_label == "psk/sip:alice@example.org"
    assert parse_uri(token_uri("k", pin_env="KMS_PIN")).pin_location() == ("KMS_PIN", None)


def test_module_name_is_found_in_the_module_folders() -> None:
    assert find_module("libopencryptoki") == DEFAULT_OPENCRYPTOKI_MODULE
    assert find_module("opencryptoki") == DEFAULT_OPENCRYPTOKI_MODULE
    assert find_module("softhsm2") == SOFTHSM
    with pytest.raises(Pkcs11UriError, match="not found"):
        find_module("no-such-module")
    with pytest.raises(Pkcs11UriError, match="bare module name"):
        find_module("../etc/x")


# --- [token] uri in kms.toml ------------------------------------------------------------------


def _config(tmp_path: Path, token: str) -> str:
    text = render_config("sip:kms.example.org", module="/placeholder.so", token_label="x",
                         pin_env="P")
    start = text.index("[token]")
    end = text.index("[server]")
    return text[:start] + "[token]\n" + token + "\n\n" + text[end:]


def test_token_uri_alone_configures_the_token(tmp_path: Path) -> None:
    uri = f"pkcs11:token=kms;serial=42?module-path={SOFTHSM}&pin-source=file:/etc/kms/pin"
    cfg = parse_config(_config(tmp_path, f'uri = "{uri}"'), tmp_path)
    t = cfg.token
    assert (t.module, t.label, t.serial, t.pin_env, t.pin_file, t.uri) == (
        SOFTHSM, "kms", "42", None, Path("/etc/kms/pin"), uri)
    cfg = parse_config(_config(tmp_path, 'uri = "pkcs11:token=kms?module-name=softhsm2&'
                                         'pin-source=env:KMS_PIN"'), tmp_path)
    assert (cfg.token.module, cfg.token.pin_env) == (SOFTHSM, "KMS_PIN")


def test_token_uri_beside_the_classic_keys(tmp_path: Path) -> None:
    cfg = parse_config(_config(tmp_path, 'uri = "pkcs11:token=kms"\nmodule = "/m.so"\n'
                                         'pin_file = "pin"'), tmp_path)
    assert (cfg.token.module, cfg.token.label, cfg.token.pin_file) == (
        "/m.so", "kms", tmp_path / "pin")
    # The same value both ways is fine; different values are an error naming the key.
    parse_config(_config(tmp_path, 'uri = "pkcs11:token=kms"\nlabel = "kms"\nmodule = "/m.so"\n'
                                   'pin_env = "P"'), tmp_path)
    with pytest.raises(ConfigError, match=r'\[token\] label: "other" differs from the uri.s '
                                          r'"kms"'):
        parse_config(_config(tmp_path, 'uri = "pkcs11:token=kms"\nlabel = "other"\n'
                                       'module = "/m.so"\npin_env = "P"'), tmp_path)


@pytest.mark.parametrize(("token", "message"), [
    ('uri = "pkcs11:token=kms?pin-value=secret"', "pin-value is refused"),
    ('uri = "pkcs11:token=kms;object=psk;type=secret-key?module-path=/m.so&pin-source=env:P"',
     "names a key"),
    ('uri = "pkcs11:token=kms?pin-source=env:P"', r"\[token\] module: is required"),
    (f'uri = "pkcs11:token=kms?module-path={SOFTHSM}&pin-source=env:P"\npin_file = "pin"',
     "pin-source differs from pin_env / pin_file"),
    ('uri = "pkcs11:?module-path=/m.so&pin-source=env:P"', r"\[token\] label: is required"),
])
def test_bad_token_uri_in_config(tmp_path: Path, token: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as ei:
        parse_config(_config(tmp_path, token), tmp_path)
    assert "secret" not in str(ei.value).replace("secret-key", "")
