"""Fixtures for the endpoint library's tests: the endpoints talk to the KMS core on the
software key store and in-memory ports (tests/core/world.py); no token is needed."""

from __future__ import annotations

import pytest

from tests.core.world import World, make_world


@pytest.fixture
def world() -> World:
    return make_world()
