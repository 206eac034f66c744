"""``kms status`` without a usable kms.toml: one line and exit status 1, not a traceback.
(A running server is asked in tests/observability/test_prometheus.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from kms.cli import main


def test_status_of_a_home_without_kms_toml_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--home", str(tmp_path / "nowhere"), "status"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("kms: error: ") and "kms.toml: not found" in err
    assert "--target and --metrics" in err
