"""Session-wide fixtures shared by several test folders.

``ock_token``: openCryptoki's soft token, reset once per test session (it is machine-global
state; see tests/token_modules.py). One session fixture, so that every folder shares the one
lock and the one reset.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.token_modules import OckToken, opencryptoki_token


@pytest.fixture(scope="session")
def ock_token() -> Iterator[OckToken]:
    with opencryptoki_token() as token:
        yield token
