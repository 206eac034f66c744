"""The token gate: a writer-preferring readers/writer lock."""

from __future__ import annotations

import threading
import time

from hsm.locking import Gate


def test_writer_waits_for_readers_and_is_woken_by_the_last() -> None:
    gate = Gate()
    gate.acquire_shared()
    gate.acquire_shared()
    got = threading.Event()

    def writer() -> None:
        with gate.exclusive():
            got.set()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(0.1)
    assert not got.is_set()
    gate.release_shared()
    time.sleep(0.1)
    assert not got.is_set()  # one reader still inside
    gate.release_shared()
    assert got.wait(5)  # the last reader out wakes the writer
    t.join(5)


def test_waiting_writer_blocks_new_readers() -> None:
    gate = Gate()
    gate.acquire_shared()
    order: list[str] = []

    def writer() -> None:
        with gate.exclusive():
            order.append("writer")

    def reader() -> None:
        with gate.shared():
            order.append("reader")

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    time.sleep(0.1)  # the writer is waiting now
    r = threading.Thread(target=reader, daemon=True)
    r.start()
    time.sleep(0.1)
    assert order == []  # the new reader queues behind the waiting writer
    gate.release_shared()
    w.join(5)
    r.join(5)
    assert order == ["writer", "reader"]
