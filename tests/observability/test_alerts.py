"""The alerting rules in deploy/prometheus: valid (`promtool check rules`), and unit-tested
(`promtool test rules`): every alert has a case where it fires and one where it stays quiet,
and a rule that never fires makes the unit tests fail."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.observability.helpers import promtool

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "kms-alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "kms-alerts.test.yml"
DOC = REPO / "docs" / "observability.md"

REQUIRED = {
    "KmsReplicaDown", "KmsTokenDown", "KmsRefusalRatioHigh", "KmsLatencyP99High",
    "KmsPeerFailing", "KmsTpkNotRotated", "KmsReplayStorm", "KmsAbuseStorm",
    "KmsReplayCacheFull", "KmsCertificateExpiresSoon", "KmsCrlExpiresSoon", "KmsCrlExpired",
    "KmsTlsReloadRejected",
}


def alerts() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def test_rules_are_valid() -> None:
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in r.stdout
    assert set(alerts()) == REQUIRED


def test_rule_unit_tests_pass() -> None:
    r = promtool("test", "rules", str(RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_fires_and_stays_quiet_somewhere() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for t in case.get("alert_rule_test", []):
            (fires if t["exp_alerts"] else quiet).add(t["alertname"])
    assert fires == REQUIRED
    assert quiet == REQUIRED


def test_every_alert_has_a_runbook_section() -> None:
    text = DOC.read_text()
    anchors = {m.lower() for m in re.findall(r"^### (Kms\w+)", text, re.MULTILINE)}
    for name, rule in alerts().items():
        assert name.lower() in anchors, name
        assert rule["annotations"]["runbook_url"] == f"docs/observability.md#{name.lower()}"


def test_a_rule_that_never_fires_fails_its_unit_test(tmp_path: Path) -> None:
    for name in ("KmsTokenDown", "KmsTpkNotRotated"):
        doc = yaml.safe_load(RULES.read_text())
        for g in doc["groups"]:
            for rule in g["rules"]:
                if rule.get("alert") == name:
                    rule["expr"] = "vector(1) > 2"
        (tmp_path / RULES.name).write_text(yaml.safe_dump(doc))
        shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
        r = promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
        assert r.returncode != 0
        assert name in r.stdout + r.stderr
