"""The Kubernetes manifests in deploy/kubernetes, validated offline against the Kubernetes
JSON schemas (kubernetes-validate, strict: unknown fields are errors), and checked for what
cluster mode needs: 3+ replicas, a headless Service, native gRPC probes, a
PodDisruptionBudget, anti-affinity, PIN and database password from Secrets, the PKCS#11
configuration mounted, PostgreSQL as an external service, and a kms.toml the KMS accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kms.server.config import parse_config

DIR = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # the oldest release we document; grpc probes exist since 1.24


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


DOCS = documents()


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in DOCS if d["kind"] == kind]


@pytest.mark.parametrize(("name", "doc"), DOCS, ids=[n for n, _ in DOCS])
def test_manifest_is_valid_kubernetes(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_catches_a_broken_manifest() -> None:
    (deployment,) = by_kind("Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secrets() -> None:
    kust = yaml.safe_load((DIR / "kustomization.yaml").read_text())
    files = {p.name for p in DIR.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert set(kust["resources"]) == files


def test_deployment_is_a_cluster() -> None:
    (deployment,) = by_kind("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] >= 3
    labels = spec["selector"]["matchLabels"]
    pod = spec["template"]["spec"]
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["labelSelector"]["matchLabels"] == labels
    (c,) = pod["containers"]
    port = c["ports"][0]["containerPort"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port, probe  # native gRPC probes
    # Readiness is the KMS service's health (token gone: NOT_SERVING); liveness the overall.
    assert c["readinessProbe"]["grpc"]["service"] == "mikey.kms.v1.KeyManagement"
    assert "service" not in c["livenessProbe"]["grpc"]
    env = {e["name"]: e for e in c["env"]}
    assert env["KMS_PIN"]["valueFrom"]["secretKeyRef"]["name"] == "kms-token-pin"
    assert env["KMS_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "kms-db"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/hsm"]["name"]]["configMap"]["name"] == "kms-pkcs11"
    assert volumes[mounts["/var/lib/kms/kms.toml"]["name"]]["configMap"]["name"] == "kms-config"

    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert 1 <= pdb["spec"]["minAvailable"] < spec["replicas"]


def test_services_headless_and_external_postgres() -> None:
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    kms = services["kms"]["spec"]
    assert kms["clusterIP"] == "None"
    assert kms["ports"][0]["port"] == 50051
    assert services["kms-postgres"]["spec"]["type"] == "ExternalName"


def test_kms_toml_in_the_config_map_is_accepted_and_has_no_secret(tmp_path: Path) -> None:
    config = {c["metadata"]["name"]: c for c in by_kind("ConfigMap")}
    text = config["kms-config"]["data"]["kms.toml"]
    parsed = parse_config(text, tmp_path)
    assert parsed.store.backend == "postgresql"
    assert parsed.store.password_env == "KMS_DB_PASSWORD"
    assert parsed.token.pin_env == "KMS_PIN"
    assert parsed.store.dsn is not None and "kms-postgres" in parsed.store.dsn
    assert "client.conf" in config["kms-pkcs11"]["data"]
    for _, doc in DOCS:
        if doc["kind"] != "Secret":
            assert "password =" not in yaml.safe_dump(doc)
