"""A real Prometheus server (Debian `prometheus`, started here on a free port with its own
storage) scrapes a single-process `kms serve` whose `/metrics` listener is set in kms.toml,
loads the alert rules, and answers, through its HTTP API, queries about the calls the test
made. `kms status` asks the same server."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kms.endpoint.client import run_call
from tests.e2e.harness import ALICE, BOB, Kms, free_port, make_home, run_kms, running_kms
from tests.observability.helpers import promtool, samples, scrape, tool, value
from tests.observability.test_alerts import RULES

SCRAPE_S = 1


@dataclass
class Stack:
    kms: Kms
    metrics_port: int
    prom: str  # http://127.0.0.1:PORT


def prom_get(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else base + path
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def query(base: str, promql: str) -> list[dict[str, Any]]:
    data = prom_get(base, "/api/v1/query", query=promql)
    assert data["resultType"] == "vector"
    return list(data["result"])


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("prom")
    home = make_home(base / "home")
    mport = free_port()
    cfg = home / "kms.toml"
    text = cfg.read_text()
    assert '# listen = "127.0.0.1:9464"' in text
    cfg.write_text(text.replace('# listen = "127.0.0.1:9464"', f'listen = "127.0.0.1:{mport}"'))
    pport = free_port()
    (base / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: {SCRAPE_S}s\n  evaluation_interval: {SCRAPE_S}s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: kms\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{mport}']\n"
    )
    url = f"http://127.0.0.1:{pport}"
    with contextlib.ExitStack() as cleanup:  # stopped and closed even if the setup fails
        log = cleanup.enter_context((base / "prometheus.log").open("wb"))
        prom = subprocess.Popen(
            [tool("prometheus"), f"--config.file={base / 'prometheus.yml'}",
             f"--storage.tsdb.path={base / 'data'}", f"--web.listen-address=127.0.0.1:{pport}",
             "--log.level=warn"],
            stdout=log, stderr=log,
        )  # fmt: skip
        cleanup.callback(_stop, prom)

        def ready() -> bool:
            assert prom.poll() is None, (base / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        k = cleanup.enter_context(running_kms(home))
        wait_for(ready, "prometheus ready")
        yield Stack(k, mport, url)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def test_single_process_exposes_process_metrics(stack: Stack) -> None:
    text = scrape(stack.metrics_port)
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked
    s = samples(text)
    assert value(s, "process_cpu_seconds_total") > 0
    assert value(s, "kms_token_up") == 1
    assert value(s, "kms_build_info", version="0.1.0") == 1


def test_prometheus_scrapes_the_calls_made(stack: Stack) -> None:
    k = stack.kms
    for _ in range(5):
        run_call(k.client(), k.initiator(ALICE), k.client(), k.responder(BOB))
    expected = value(samples(scrape(stack.metrics_port)), "kms_calls_total",
                     method="RequestTicket", outcome="ok")
    assert expected >= 5
    promql = 'sum(kms_calls_total{job="kms",method="RequestTicket",outcome="ok"})'

    def scraped() -> bool:
        r = query(stack.prom, promql)
        return bool(r) and float(r[0]["value"][1]) == expected

    wait_for(scraped, f"{promql} == {expected}")
    up = query(stack.prom, 'up{job="kms"}')
    assert [float(r["value"][1]) for r in up] == [1.0]
    tokens = query(stack.prom, "kms_token_up")
    assert [float(r["value"][1]) for r in tokens] == [1.0]
    resolves = query(stack.prom, 'sum(kms_resolves_total{path="local",result="ok"})')
    assert float(resolves[0]["value"][1]) >= 5
    # Latency histogram usable as the alert and the dashboard use it.
    p99 = query(stack.prom, "histogram_quantile(0.99, sum by (le) "
                            "(kms_call_duration_seconds_bucket{method=\"RequestTicket\"}))")
    assert 0 < float(p99[0]["value"][1]) <= 10


def test_prometheus_loads_the_alert_rules_and_none_fires(stack: Stack) -> None:
    groups = prom_get(stack.prom, "/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules} >= {"KmsTokenDown", "KmsReplicaDown", "KmsTpkNotRotated"}

    def evaluated() -> bool:
        now = prom_get(stack.prom, "/api/v1/rules")["groups"]
        return all(r.get("lastEvaluation", "").startswith("20") and r["health"] == "ok"
                   for g in now for r in g["rules"])

    wait_for(evaluated, "rules evaluated")
    assert prom_get(stack.prom, "/api/v1/alerts")["alerts"] == []


def test_kms_status_reports_the_running_server(stack: Stack) -> None:
    k = stack.kms
    run_call(k.client(), k.initiator(ALICE), k.client(), k.responder(BOB))
    r = run_kms(k.home, "status", "--target", k.target, "--json")
    report = json.loads(r.stdout)
    assert report["health"] == "SERVING"
    assert report["token"] == {"up": True, "reconnects": 0}
    assert report["version"] == "0.1.0"
    assert report["tpk"]["current_version"] == 1
    assert report["tpk"]["versions"] == {"current": 1, "active": 0, "retired": 0}
    assert report["tpk"]["rotation_due"] is False
    assert report["registry"]["endpoints"] == 7
    assert report["calls"]["RequestTicket"]["ok"] >= 1
    assert report["peers"] == {}
    human = run_kms(k.home, "status", "--target", k.target)
    assert f"{k.target}: SERVING" in human.stdout
    assert "token         up" in human.stdout
    assert "TPK           current v1" in human.stdout
    assert "7 endpoints" in human.stdout


def test_kms_status_of_a_server_that_is_not_there(tmp_path: Path) -> None:
    home = tmp_path / "nohome"
    r = run_kms(home, "status", "--target", f"127.0.0.1:{free_port()}",
                "--metrics", f"127.0.0.1:{free_port()}", "--timeout", "1", check=False)
    assert r.returncode == 1, r.stderr
    assert "unreachable" in r.stdout
    assert "cannot read metrics" in r.stdout


DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "kms-dashboard.json"


def test_dashboard_queries_run_and_name_served_metrics(stack: Stack) -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 20
    served = {f.name for f in text_string_to_metric_families(scrape(stack.metrics_port))}
    for expr in exprs:
        for name in re.findall(r"\b(kms_[a-z0-9_]+)", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert base in served or base.removesuffix("_total") in served, (name, expr)
        promql = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        query(stack.prom, promql)  # a syntax error is status "error" (asserted there)
