"""kms.toml ``[store]``: the embedded SQLite default, PostgreSQL for a cluster, and the
password never in the file (only where to read it from)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms.server.config import ConfigError, parse_config, render_store_section

HOME = Path("/srv/kms")
MINIMAL = """
[kms]
id = "kms:kms.example.org"
[token]
module = "/usr/lib/softhsm/libsofthsm2.so"
label = "kms"
pin_file = "token/pin"
"""


def test_sqlite_is_the_default() -> None:
    c = parse_config(MINIMAL, HOME)
    assert c.store.backend == "sqlite" and c.store.dsn is None


def test_postgresql_with_a_password_file() -> None:
    c = parse_config(
        MINIMAL + '[store]\nbackend = "postgresql"\n'
        'dsn = "postgresql://kms@db1:5432,db2:5432/kms?target_session_attrs=read-write"\n'
        'password_file = "db.pass"\npool_size = 8\n',
        HOME,
    )
    assert c.store.backend == "postgresql"
    assert c.store.password_file == HOME / "db.pass"
    assert c.store.pool_size == 8
    assert c.store.dsn is not None and "db2:5432" in c.store.dsn


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ('backend = "mysql"', r"\[store\] backend: must be one of"),
        ('backend = "postgresql"', r"\[store\] dsn: is required"),
        ('backend = "postgresql"\ndsn = "postgresql://kms:hunter2@db/kms"',
         r"\[store\] dsn: must not contain a password"),
        ('backend = "postgresql"\ndsn = "host=db password=hunter2 dbname=kms"',
         r"\[store\] dsn: must not contain a password"),
        ('backend = "postgresql"\ndsn = "not a dsn = ="', r"\[store\] dsn: not a PostgreSQL"),
        ('password_env = "A"\npassword_file = "f"', r"\[store\] password_env: give either"),
        ('password_env = "A B"', r"\[store\] password_env: must be an environment variable"),
        ('pool_size = 0', r"\[store\] pool_size: must be an integer"),
        ('passwd = "x"', r"\[store\] passwd: unknown key"),
    ],
)
def test_store_errors(store: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(MINIMAL + "[store]\n" + store + "\n", HOME)
    assert "hunter2" not in str(info.value)


def test_rendered_store_section_parses() -> None:
    text = render_store_section("postgresql://kms@db/kms", password_env="KMS_DB_PASSWORD")
    c = parse_config(MINIMAL + text, HOME)
    assert (c.store.backend, c.store.password_env) == ("postgresql", "KMS_DB_PASSWORD")
