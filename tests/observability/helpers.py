"""Scraping ``/metrics`` and running promtool / prometheus for the observability tests."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

REPO_DEPLOY = "deploy/prometheus"


def scrape(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        ctype = r.headers["Content-Type"]
        assert ctype.startswith("text/plain"), ctype
        return str(r.read().decode())


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(s: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in s.items() if n == name and want <= ls)


def has(s: Samples, name: str) -> bool:
    return any(n == name for n, _ in s)


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is required (Debian package prometheus; scripts/test-services.sh)"
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], input=stdin, capture_output=True, text=True, timeout=120,
        check=False,
    )


def label_sets(s: Samples, name: str) -> list[Mapping[str, str]]:
    return [dict(ls) for n, ls in s if n == name]
