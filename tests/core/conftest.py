"""Fixtures for the KMS core tests: the core on the software key store and in-memory ports
(see tests/core/world.py). This ``world`` overrides the token-backed one of tests/conftest.py."""

from __future__ import annotations

import pytest

from tests.core.world import World, make_world


@pytest.fixture
def world() -> World:
    return make_world()
