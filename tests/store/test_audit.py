"""The audit sinks: bounded records, size-based rotation across processes, and reopening
a log renamed by the system's log rotation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from kms.store.audit import (
    MAX_FIELD_CHARS,
    MAX_RECORD_BYTES,
    JsonLinesAuditSink,
    bounded_record,
    bounded_text,
)

REPO = Path(__file__).resolve().parents[2]


def record(i: int, sender: str = "sip:alice@example.org") -> dict[str, object]:
    return {"correlation_id": f"c{i}", "time": 1.5, "size": 10, "event": "refused",
            "outcome": "unauthenticated", "error_no": 0, "sender": sender}  # fmt: skip


def test_long_fields_are_cut_with_length_and_digest() -> None:
    long = "x" * 60_000
    cut = bounded_text(long)
    assert len(cut) <= MAX_FIELD_CHARS and "60000 chars, sha256:" in cut
    assert bounded_text("short") == "short"
    assert bounded_text("x" * 60_000 + "y") != cut  # different inputs stay distinguishable
    line = bounded_record(record(1, long))
    assert len(line.encode()) <= MAX_RECORD_BYTES
    assert json.loads(line)["outcome"] == "unauthenticated"


def test_record_over_the_cap_keeps_its_fixed_fields() -> None:
    many = {**record(2), **{f"f{i}": "y" * 200 for i in range(50)}}
    out = json.loads(bounded_record(many))
    assert out["truncated"] is True and out["correlation_id"] == "c2"
    assert out["outcome"] == "unauthenticated" and "f1" not in out


def test_rotation_bounds_the_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = JsonLinesAuditSink(path, max_bytes=4096, keep=2)
    for i in range(1000):
        sink.emit(record(i, "z" * 100))
    sink.close()
    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("audit.log"))
    assert files == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.lock"]
    for name in ("audit.log", "audit.log.1", "audit.log.2"):
        size = (tmp_path / name).stat().st_size
        assert size < 4096 + MAX_RECORD_BYTES, (name, size)
        for line in (tmp_path / name).read_text().splitlines():
            json.loads(line)  # whole records only
    last = json.loads((tmp_path / "audit.log").read_text().splitlines()[-1])
    assert last["correlation_id"] == "c999"


def test_keep_zero_deletes_instead_of_keeping(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = JsonLinesAuditSink(path, max_bytes=4096, keep=0)
    for i in range(200):
        sink.emit(record(i))
    sink.close()
    assert not (tmp_path / "audit.log.1").exists()
    assert path.stat().st_size < 4096 + MAX_RECORD_BYTES


def test_renamed_log_is_reopened(tmp_path: Path) -> None:
    """logrotate without copytruncate: rename, and the next record goes to a new file."""
    path = tmp_path / "audit.log"
    sink = JsonLinesAuditSink(path, max_bytes=0)
    sink.emit(record(1))
    os.rename(path, tmp_path / "audit.log.rotated")
    sink.emit(record(2))
    sink.close()
    assert json.loads(path.read_text())["correlation_id"] == "c2"
    assert json.loads((tmp_path / "audit.log.rotated").read_text())["correlation_id"] == "c1"


def test_rotation_across_processes_loses_no_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from kms.store.audit import JsonLinesAuditSink
        sink = JsonLinesAuditSink(Path({str(path)!r}), max_bytes=8192, keep=1000)
        for i in range(300):
            sink.emit({{"correlation_id": sys.argv[1] + "-" + str(i), "reason": "r" * 50}})
        sink.close()
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, name], cwd=REPO) for name in "ab"
    ]
    assert [p.wait(60) for p in procs] == [0, 0]
    seen: list[str] = []
    for f in tmp_path.iterdir():
        if f.name.startswith("audit.log") and not f.name.endswith(".lock"):
            seen += [json.loads(x)["correlation_id"] for x in f.read_text().splitlines()]
    assert sorted(seen) == sorted(f"{n}-{i}" for n in "ab" for i in range(300))
    assert len([f for f in tmp_path.iterdir() if f.name.startswith("audit.log.")]) > 3


FULL_DISK = """
import errno, json, resource, signal, sys
from pathlib import Path
from kms.store.audit import JsonLinesAuditSink

path = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: EFBIG, as a full disk
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
sink = JsonLinesAuditSink(path, max_bytes=0)

def rec(i):
    return {"correlation_id": f"c{i}", "event": "ticket.issued", "outcome": "ok",
            "sender": "sip:alice@example.org" * 4}

def refused(i, room):
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + room, hard))
    try:
        sink.emit(rec(i))
    except OSError as exc:
        assert exc.errno in (errno.EFBIG, errno.ENOSPC), exc
    else:
        raise AssertionError(f"record {i} was accepted")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))

sink.emit(rec(1))
refused(2, 40)   # part of the line fits
sink.emit(rec(3))
refused(4, 0)    # nothing fits
sink.emit(rec(5))
sink.close()
print("done")
"""


def test_a_record_the_disk_refused_never_appears_later(tmp_path: Path) -> None:
    """Disk full: the call whose record could not be written is answered INTERNAL, so its
    record must not be written later by a buffer flushed with the next one; a line the file
    system took only in part is ended, so the next records stay whole lines."""
    path = tmp_path / "audit.log"
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(path)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
    ids = []
    for line in path.read_text().splitlines():
        try:
            ids.append(json.loads(line)["correlation_id"])
        except ValueError:
            ids.append("torn")
    assert ids == ["c1", "torn", "c3", "c5"]
