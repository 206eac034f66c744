"""``kms store replica`` (kms.server.replica) on the kms.toml text alone: no token, no
database is opened (a replica home is a copy of the source's configuration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms.server.config import parse_config
from kms.server.replica import ReplicaError, make_replica_home

SOURCE = """\
[kms]
id = "kms:kms.example.org"

[token]
module = "/usr/lib/softhsm/libsofthsm2.so"
label = "kms"
pin_file = "token/pin"

[server]
listen = "127.0.0.1:50051"

[pk]
crl = "crls"

[metrics]
listen = "127.0.0.1:9464"

[store]
backend = "postgresql"
dsn = "postgresql://kms@db1:5432/kms"
password_file = "db.pass"
"""


def source_home(tmp_path: Path, text: str = SOURCE) -> Path:
    src = tmp_path / "a"
    src.mkdir()
    (src / "kms.toml").write_text(text)
    return src


def test_listen_replaces_the_server_address_not_the_metrics_one(tmp_path: Path) -> None:
    src = source_home(tmp_path)
    dst = make_replica_home(src, tmp_path / "b", "127.0.0.1:50052")
    config = parse_config((dst / "kms.toml").read_text(), dst)
    assert config.server.listen == "127.0.0.1:50052"
    assert config.metrics.listen == "127.0.0.1:9464"


def test_relative_paths_name_the_source_home_crl_included(tmp_path: Path) -> None:
    src = source_home(tmp_path)
    dst = make_replica_home(src, tmp_path / "b")
    config = parse_config((dst / "kms.toml").read_text(), dst)
    assert config.pk.crl == src / "crls"
    assert config.token.pin_file == src / "token" / "pin"
    assert config.store.password_file == src / "db.pass"
    assert config.server.listen == "127.0.0.1:50051"


def test_a_source_without_a_server_listen_line_is_refused_clearly(tmp_path: Path) -> None:
    src = source_home(tmp_path, SOURCE.replace('listen = "127.0.0.1:50051"\n', ""))
    with pytest.raises(ReplicaError, match=r"has no \[server\] listen line to replace"):
        make_replica_home(src, tmp_path / "b", "127.0.0.1:50052")
    assert not (tmp_path / "b" / "kms.toml").exists()
