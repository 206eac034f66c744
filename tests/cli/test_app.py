"""`kms app`: authorised applications (IDRapp), as an operator runs them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def test_app_add_list_remove(home: Path, kms: Any, kms_fails: Any, snapshot: Any) -> None:
    assert "every application is authorised" in kms(home, "app", "list").stdout
    kms(home, "app", "add", "urn:app:voice")
    assert [a["identity"] for a in json.loads(kms(home, "app", "list", "--json").stdout)] == [
        "urn:app:voice"
    ]
    before = snapshot(home)
    kms_fails(home, "app", "add", "urn:app:voice", match="already authorised")
    kms_fails(home, "app", "remove", "urn:app:video", match="unknown application")
    assert snapshot(home) == before
    kms(home, "app", "remove", "urn:app:voice")
    assert json.loads(kms(home, "app", "list", "--json").stdout) == []
