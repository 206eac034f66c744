"""kms.toml parsing: defaults, path resolution, one-line validation errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms.keystore import RsaPadding
from kms.mikey.prf import PrfFunc
from kms.server.config import (
    ConfigError,
    PolicySettings,
    load_config,
    parse_config,
    render_config,
    split_listen,
)

HOME = Path("/srv/kms")

MINIMAL = """
[kms]
id = "kms:kms.example.org"
[token]
module = "/usr/lib/softhsm/libsofthsm2.so"
label = "kms"
pin_file = "token/pin"
"""


def test_defaults() -> None:
    c = parse_config(MINIMAL, HOME)
    assert c.kms_id == "kms:kms.example.org"
    assert c.kms_id_bytes == b"kms:kms.example.org"
    assert c.token.pin_file == HOME / "token/pin"  # relative -> against the home
    assert c.token.pin_env is None
    assert c.token.softhsm_conf is None
    assert c.server.listen == "127.0.0.1:50051"
    assert (c.server.host, c.server.port) == ("127.0.0.1", 50051)
    assert c.server.workers == 1
    assert c.server.core_concurrency == 0  # auto
    assert not c.server.tls
    assert not c.server.allow_plaintext_non_loopback
    assert c.policy == PolicySettings()
    assert c.policy.prf_func is PrfFunc.MIKEY_1
    assert c.policy.allowed_key_types == ("tgk", "tek", "gtgk")
    assert (c.policy.max_lifetime_s, c.policy.default_lifetime_s) == (86400, 3600)
    assert c.policy.forking == "allowed"
    assert c.policy.reuse_allowed
    assert (c.policy.timestamp_window_s, c.policy.replay_cache_size) == (120, 0)  # 0: auto
    assert c.policy.rate_limit_per_s == 50
    assert c.pk.ca_bundle is None
    assert c.pk.rsa_padding is RsaPadding.PKCS1V15


def test_full() -> None:
    text = MINIMAL.replace('pin_file = "token/pin"', 'pin_env = "KMS_PIN"\nserial = "abc"') + """
softhsm_conf = "/etc/softhsm2.conf"
[server]
listen = "[::]:6000"
workers = 4
tls_cert = "tls/cert.pem"
tls_key = "/abs/key.pem"
tls_client_ca = "tls/ca.pem"
[policy]
prf = "hmac-sha-256"
allowed_key_types = ["tek"]
forking = "required"
reuse_allowed = false
rate_limit_per_s = 0
[pk]
ca_bundle = "ca.pem"
pke_padding = "oaep-sha1"
"""
    c = parse_config(text, HOME)
    assert c.token.pin_env == "KMS_PIN"
    assert c.token.serial == "abc"
    assert c.token.softhsm_conf == Path("/etc/softhsm2.conf")
    assert (c.server.host, c.server.port, c.server.workers) == ("::", 6000, 4)
    assert c.server.tls_cert == HOME / "tls/cert.pem"
    assert c.server.tls_key == Path("/abs/key.pem")
    assert c.server.tls_client_ca == HOME / "tls/ca.pem"
    assert c.policy.prf_func is PrfFunc.PRF_HMAC_SHA_256
    assert c.policy.allowed_key_types == ("tek",)
    assert c.policy.forking == "required"
    assert not c.policy.reuse_allowed
    assert c.pk.ca_bundle == HOME / "ca.pem"
    assert c.pk.rsa_padding is RsaPadding.OAEP_SHA1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('id = "kms:kms.example.org"', "id = 5"), r"\[kms\] id: must be a string"),
        (('id = "kms:kms.example.org"', 'id = "not a uri"'), r"\[kms\] id: must be a URI"),
        (('id = "kms:kms.example.org"', ""), r"\[kms\] id: is required"),
        (('label = "kms"', ""), r"\[token\] label: is required"),
        (('module = "/usr/lib/softhsm/libsofthsm2.so"', ""), r"\[token\] module: is required"),
        (('pin_file = "token/pin"', ""), r"\[token\] pin_file: is required"),
        (('pin_file = "token/pin"', 'pin_file = "p"\npin_env = "X"'),
         r"\[token\] pin_env: give either"),
        (('pin_file = "token/pin"', 'pin_env = "1 2"'), r"\[token\] pin_env: must be an env"),
        (('label = "kms"', 'label = "kms"\npin = "1234"'), r"\[token\] pin: unknown key"),
        (("", "[server]\nlisten = \"localhost\"\n"), r"\[server\] listen: expected HOST:PORT"),
        (("", "[server]\nlisten = \"1.2.3.4:70000\"\n"), r"\[server\] listen: port must be"),
        (("", "[server]\nlisten = \"0.0.0.0:50051\"\n"),
         r"\[server\] listen: .*allow_plaintext_non_loopback"),
        (("", "[server]\nworkers = 0\n"), r"\[server\] workers: must be an integer in 1\.\.256"),
        (("", "[server]\nworkers = true\n"), r"\[server\] workers: must be an integer"),
        (("", "[server]\ncore_concurrency = -1\n"),
         r"\[server\] core_concurrency: must be an integer in 0\.\.256"),
        (("", "[server]\ntls_cert = \"c.pem\"\n"), r"\[server\] tls_key: .*together"),
        (("", "[server]\ntls_client_ca = \"c.pem\"\n"), r"\[server\] tls_client_ca: needs"),
        (("", "[server]\nallow_plaintext_non_loopback = \"yes\"\n"),
         r"\[server\] allow_plaintext_non_loopback: must be true or false"),
        (("", "[policy]\nprf = \"hmac-md5\"\n"), r"\[policy\] prf: must be one of"),
        (("", "[policy]\nforking = \"sometimes\"\n"), r"\[policy\] forking: must be one of"),
        (("", "[policy]\nallowed_key_types = [\"tgk\", \"psk\"]\n"),
         r"\[policy\] allowed_key_types: must be a non-empty list"),
        (("", "[policy]\nallowed_key_types = []\n"), r"\[policy\] allowed_key_types"),
        (("", "[policy]\nmax_lifetime_s = -1\n"), r"\[policy\] max_lifetime_s: must be an int"),
        (("", "[policy]\nmax_lifetime_s = 60\n"),
         r"\[policy\] default_lifetime_s: must not exceed max_lifetime_s"),
        (("", "[policy]\ntimestamp_window_s = 1.5\n"), r"\[policy\] timestamp_window_s"),
        (("", "[policy]\nreplay_cache_sise = 5\n"), r"\[policy\] replay_cache_sise: unknown"),
        (("", "[pk]\npke_padding = \"oaep-sha256\"\n"), r"\[pk\] pke_padding: must be one of"),
        (("", "[extra]\n"), r"\[extra\]: unknown section"),
        (("", "[kms\n"), r"not valid TOML"),
    ],
)
def test_validation_errors(edit: tuple[str, str], message: str) -> None:
    old, new = edit
    text = MINIMAL.replace(old, new) if old else MINIMAL + new
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(text, HOME)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("kms.toml: ")


def test_non_loopback_allowed_with_tls_or_flag() -> None:
    tls = MINIMAL + '[server]\nlisten = "0.0.0.0:1"\ntls_cert = "c"\ntls_key = "k"\n'
    assert parse_config(tls, HOME).server.tls
    flag = MINIMAL + '[server]\nlisten = "10.0.0.1:1"\nallow_plaintext_non_loopback = true\n'
    assert parse_config(flag, HOME).server.host == "10.0.0.1"
    for host in ("localhost:1", "[::1]:1", "127.0.0.2:1"):
        assert parse_config(MINIMAL + f'[server]\nlisten = "{host}"\n', HOME)


def test_split_listen() -> None:
    assert split_listen("[::1]:50051") == ("::1", 50051)
    assert split_listen("kms.example.org:443") == ("kms.example.org", 443)
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_listen("::1:50051")


def test_rendered_template_round_trips() -> None:
    text = render_config(
        'kms:odd"id\\x',
        module="/m.so",
        token_label="kms",
        pin_file="token/pin",
        softhsm_conf="token/softhsm2.conf",
    )
    c = parse_config(text, HOME)
    assert c.kms_id == 'kms:odd"id\\x'
    assert c.token.softhsm_conf == HOME / "token/softhsm2.conf"
    assert c.policy == PolicySettings()
    assert "pin_file" in text
    ext = render_config("kms:k", module="/m.so", token_label=None, token_serial="42",
                        pin_env="KMS_PIN")
    c = parse_config(ext, HOME)
    assert (c.token.label, c.token.serial, c.token.pin_env) == (None, "42", "KMS_PIN")


def test_load_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)
    (tmp_path / "kms.toml").write_text(MINIMAL)
    assert load_config(tmp_path).token.pin_file == tmp_path / "token/pin"
