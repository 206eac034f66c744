"""Mechanism discovery: the plan chosen from a module's mechanism table (pure, with the tables
of SoftHSM2, openCryptoki and made-up modules), and refusal when the token is opened."""

from __future__ import annotations

from pathlib import Path

import pytest
from pkcs11 import Mechanism as M  # noqa: N817 - short in the tables below

from hsm import TokenConfigError, open_keystore
from hsm.pkcs11.mechanisms import MechanismPlan, MechInfo, Operation, Way, plan_for
from kms.keystore import UnsupportedOperation
from kms.server.token_needs import BASE_OPERATIONS, required_operations
from tests.token_modules import OckToken

# Key-size ranges as the modules report them (measured: SoftHSM2 2.6.1, openCryptoki 3.8.1).
SOFTHSM: dict[int, MechInfo] = {int(m): i for m, i in {
    M.SHA_1_HMAC: MechInfo(20, 512), M.SHA256_HMAC: MechInfo(32, 512),
    M.AES_CTR: MechInfo(16, 32), M.AES_ECB: MechInfo(16, 32),
    M.RSA_PKCS: MechInfo(512, 16384), M.RSA_PKCS_OAEP: MechInfo(512, 16384),
    M.SHA256_RSA_PKCS: MechInfo(512, 16384), M.SHA1_RSA_PKCS: MechInfo(512, 16384),
    M.RSA_PKCS_PSS: MechInfo(512, 16384), M.SHA256_RSA_PKCS_PSS: MechInfo(512, 16384),
    M.SHA1_RSA_PKCS_PSS: MechInfo(512, 16384), M.ECDSA: MechInfo(112, 521),
    M.EC_KEY_PAIR_GEN: MechInfo(112, 521), M.GENERIC_SECRET_KEY_GEN: MechInfo(1, 2**31),
    M.RSA_PKCS_KEY_PAIR_GEN: MechInfo(512, 16384), M.AES_KEY_GEN: MechInfo(16, 32),
}.items()}
OPENCRYPTOKI: dict[int, MechInfo] = {int(m): i for m, i in {
    M.SHA_1_HMAC: MechInfo(0, 0), M.SHA256_HMAC: MechInfo(0, 0),
    M.AES_ECB: MechInfo(16, 32), M.AES_CBC: MechInfo(16, 32),
    M.RSA_PKCS: MechInfo(512, 4096), M.RSA_PKCS_OAEP: MechInfo(1024, 4096),
    M.SHA1_RSA_PKCS: MechInfo(512, 4096), M.RSA_PKCS_PSS: MechInfo(1024, 4096),
    M.SHA256_RSA_PKCS_PSS: MechInfo(1024, 4096), M.SHA1_RSA_PKCS_PSS: MechInfo(1024, 4096),
    M.GENERIC_SECRET_KEY_GEN: MechInfo(80, 2048), M.RSA_PKCS_KEY_PAIR_GEN: MechInfo(512, 4096),
}.items()}


def _without(table: dict[int, MechInfo], *mechs: M) -> dict[int, MechInfo]:
    return {k: v for k, v in table.items() if k not in {int(m) for m in mechs}}


def test_softhsm_table_gives_direct_mechanisms_for_everything() -> None:
    plan = plan_for(SOFTHSM)
    assert not plan.missing
    assert plan.method(Operation.AES_CM_128).mechanism == M.AES_CTR
    assert plan.method(Operation.SIGN_RSA_PKCS1V15_SHA256).mechanism == M.SHA256_RSA_PKCS
    assert all(not plan.method(op).fallback for op in Operation
               if op is not Operation.SIGN_ECDSA_SHA256)
    assert plan.method(Operation.RANDOM).describe() == "C_GenerateRandom"


def test_opencryptoki_table_gives_token_fallbacks() -> None:
    plan = plan_for(OPENCRYPTOKI)
    aes = plan.method(Operation.AES_CM_256)
    assert (aes.mechanism, aes.way) == (M.AES_ECB, Way.ECB_COUNTER_BLOCKS)
    assert aes.describe().startswith("CKM_AES_ECB (AES-ECB of the counter blocks")
    sign = plan.method(Operation.SIGN_RSA_PKCS1V15_SHA256)
    assert (sign.mechanism, sign.way) == (M.RSA_PKCS, Way.DIGEST_INFO)
    # SHA-1 PKCS#1 v1.5 is there directly; PSS too.
    assert plan.method(Operation.SIGN_RSA_PKCS1V15_SHA1).way is Way.DIRECT
    assert plan.method(Operation.SIGN_RSA_PSS_SHA256).way is Way.DIRECT
    # HMAC key sizes 0..0 mean "no limit", not "nothing fits".
    assert plan.method(Operation.HMAC_SHA256).way is Way.DIRECT
    assert set(plan.missing) == {Operation.GENERATE_EC, Operation.SIGN_ECDSA_SHA256}
    plan.require(BASE_OPERATIONS, "kms")  # everything a KMS needs: no error


def test_pss_falls_back_to_raw_pss_over_a_digest() -> None:
    plan = plan_for(_without(SOFTHSM, M.SHA256_RSA_PKCS_PSS))
    assert plan.method(Operation.SIGN_RSA_PSS_SHA256).way is Way.PSS_OVER_DIGEST


def test_missing_operations_name_the_mechanisms() -> None:
    plan = plan_for(_without(OPENCRYPTOKI, M.AES_ECB, M.SHA256_HMAC))
    assert plan.missing[Operation.AES_CM_128] == (
        "CKM_AES_CTR (not offered) or CKM_AES_ECB (not offered)"
    )
    with pytest.raises(UnsupportedOperation, match=r"aes-cm-128 not supported.*CKM_AES_ECB"):
        plan.method(Operation.AES_CM_128)
    with pytest.raises(TokenConfigError) as ei:
        plan.require(BASE_OPERATIONS, "hsm1")
    text = str(ei.value)
    assert "\n" not in text
    assert text.startswith("token 'hsm1' cannot serve this configuration: ")
    assert "hmac-sha256 needs CKM_SHA256_HMAC (not offered)" in text
    assert "aes-cm-128 needs CKM_AES_CTR (not offered) or CKM_AES_ECB (not offered)" in text
    assert "hmac-sha1" not in text  # only what is missing


def test_key_size_ranges_are_checked() -> None:
    # A module whose HMAC wants keys of 48 to 64 bytes (or bits) cannot take our 32-byte
    # secrets.
    table = dict(SOFTHSM)
    table[int(M.SHA256_HMAC)] = MechInfo(48, 64)
    table[int(M.RSA_PKCS_KEY_PAIR_GEN)] = MechInfo(512, 1024)
    plan = plan_for(table)
    assert plan.missing[Operation.HMAC_SHA256] == (
        "CKM_SHA256_HMAC (key sizes 48..64 exclude the size needed)"
    )
    assert Operation.GENERATE_RSA in plan.missing
    # HMAC ranges in bits (some modules) are accepted as well as bytes.
    table[int(M.SHA256_HMAC)] = MechInfo(160, 4096)
    assert plan_for(table).has(Operation.HMAC_SHA256)


def test_no_rng_is_missing_random() -> None:
    plan = plan_for(SOFTHSM, has_rng=False)
    assert "CKF_RNG" in plan.missing[Operation.RANDOM]


def test_required_operations_are_known_and_follow_pke_padding(tmp_path: Path) -> None:
    from kms.server.config import parse_config, render_config

    home = tmp_path
    text = render_config("sip:kms.example.org", module="/m.so", token_label="t", pin_env="P")
    ops = required_operations(parse_config(text, home))
    for op in ops:
        Operation(op)  # every name is a real operation
    assert "rsa-decrypt-pkcs1v15" in ops
    oaep = parse_config(text.replace('pke_padding = "pkcs1v15"', 'pke_padding = "oaep-sha1"'),
                        home)
    assert "rsa-decrypt-oaep-sha1" in required_operations(oaep)
    assert MechanismPlan({}).has(Operation.RANDOM) is False


def test_open_keystore_refuses_a_module_without_a_required_mechanism(ock_token: OckToken) -> None:
    # openCryptoki 3.8's soft token has no EC at all: a caller that needs ECDSA is refused
    # when the token is opened, in one line naming the mechanism, and nothing stays open.
    with pytest.raises(TokenConfigError) as ei:
        open_keystore(ock_token.config(), require=["hmac-sha1", "sign-ecdsa-sha256"])
    assert str(ei.value) == (
        "token 'kms-ock' cannot serve this configuration: "
        "sign-ecdsa-sha256 needs CKM_ECDSA (not offered)"
    )
    with open_keystore(ock_token.config(), require=BASE_OPERATIONS) as ks:
        assert ks.mechanisms.method(Operation.AES_CM_128).way is Way.ECB_COUNTER_BLOCKS


def test_the_home_refuses_the_token_when_it_opens_it(ock_token: OckToken, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`kms serve`, `kms init` and every operator command open the token through
    Home.keystore(): a configuration needing something the module lacks stops there, in one
    line. (No KMS setting needs EC today, so the test adds ECDSA to what the home needs.)"""
    from kms.server import home as home_mod
    from kms.server.config import parse_config, render_config
    from kms.store.registry import Registry

    pin = tmp_path / "pin"
    pin.write_text(ock_token.user_pin)
    config = parse_config(render_config("sip:kms.example.org", module=ock_token.module,
                                        token_label=ock_token.label, pin_file=str(pin)),
                          tmp_path)
    home = home_mod.Home(tmp_path, config, Registry.open(tmp_path / "r.sqlite3", create=True))
    try:
        home.keystore()  # what the configuration needs: all there (with fallbacks)
    finally:
        home.close()
    monkeypatch.setattr(home_mod, "required_operations",
                        lambda c: (*required_operations(c), "sign-ecdsa-sha256"))
    home = home_mod.Home(tmp_path, config, Registry.open(tmp_path / "r.sqlite3"))
    with pytest.raises(home_mod.HomeError) as ei:
        home.keystore()
    home.close()
    assert str(ei.value) == (
        f"cannot open token 'kms-ock' ({ock_token.module}): token 'kms-ock' cannot serve this "
        "configuration: sign-ecdsa-sha256 needs CKM_ECDSA (not offered)"
    )
