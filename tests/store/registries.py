"""Helpers of the registry tests."""

from __future__ import annotations

import time
from collections.abc import Callable

from kms.store.pg import RegistryWatcher


def generation_changes(
    watcher: RegistryWatcher, action: Callable[[], object], timeout_s: float = 10.0
) -> bool:
    """Whether the registry generation ``watcher`` follows changes after ``action`` (within
    ``timeout_s``): replicas cache registry reads until it does."""
    before = watcher.generation
    action()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if watcher.generation != before:
            return True
        time.sleep(0.02)
    return False
