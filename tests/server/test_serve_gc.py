"""A serving worker moves what start-up made out of the collector's sight (``gc.freeze``), so
that a full collection scans only what calls have made since, instead of stalling the event
loop for every object of the process (docs/performance.md, "stalls of the event loop")."""

from __future__ import annotations

import gc
import weakref

from kms.server.serve import freeze_startup_objects


class _Node:
    me: _Node | None = None


def test_freeze_collects_start_up_garbage_then_freezes_the_rest() -> None:
    garbage = _Node()
    garbage.me = garbage  # a reference cycle: only the collector frees it
    gone = weakref.ref(garbage)
    del garbage
    kept = _Node()
    before = gc.get_freeze_count()
    try:
        freeze_startup_objects()
        assert gone() is None  # collected first, not kept frozen
        assert gc.get_freeze_count() > before
        # Frozen objects are in no generation any more: a full collection does not scan them.
        assert not any(o is kept for o in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
