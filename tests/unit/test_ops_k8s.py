"""Kubernetes manifests: structure a cluster would reject or misbehave on, checked without a cluster.

Every document has apiVersion/kind/metadata.name; Deployment selectors match their pod labels;
containers declare resources and probes on named ports; credentials come only from Secrets; the
writer is a single fenced pod with a grace period longer than a block's training; Services,
PodDisruptionBudget, HPA and ServiceMonitor point at things that exist; and the ConfigMap's melo.toml
plus each Deployment's environment is accepted by the real Settings object.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from daemon.settings import Settings
from tests.unit.test_ops_common import REPO_ROOT
from tests.unit.test_ops_config_doc import load_generator

K8S = REPO_ROOT / "ops" / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
DOCS = [
    (path.name, doc)
    for path in sorted(K8S.glob("*.yaml"))
    if path.name != "kustomization.yaml"
    for doc in yaml.safe_load_all(path.read_text())
    if doc is not None
]
SECRET_NAMES = ("PASSWORD", "TOKEN", "USERNAME")


def _of_kind(kind: str) -> list[dict]:
    return [doc for _name, doc in DOCS if doc["kind"] == kind]


def _deployment(component: str) -> dict:
    matches = [d for d in _of_kind("Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    assert len(matches) == 1, f"expected one {component} Deployment, found {len(matches)}"
    return matches[0]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_every_document_has_api_version_kind_and_name_and_is_in_the_kustomization() -> None:
    for file_name, doc in DOCS:
        assert doc.get("apiVersion") and doc.get("kind"), f"{file_name}: missing apiVersion/kind"
        assert doc["metadata"].get("name"), f"{file_name}: {doc['kind']} without metadata.name"
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "melo"
    files = {name for name, _doc in DOCS}
    assert set(KUSTOMIZATION["resources"]) == files


def test_deployment_selectors_match_pod_labels_and_containers_are_complete() -> None:
    for deployment in _of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]
        assert _selects(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"]), name
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"] for v in pod["volumes"]}
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"], where
            assert container["resources"]["limits"]["memory"], where
            port_names = {p["name"] for p in container["ports"]}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert container[probe]["httpGet"]["port"] in port_names, f"{where}: {probe} on an unnamed port"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes, f"{where} mounts undeclared volume {mount['name']}"


def test_credentials_come_from_secrets_and_settings_names_are_real() -> None:
    known = load_generator().env_names()
    for deployment in _of_kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for env in container["env"]:
                assert env["name"] in known, f"{env['name']} is not a setting (docs/configuration.md)"
                if any(word in env["name"] for word in SECRET_NAMES):
                    assert "value" not in env, f"{env['name']} is a credential but is set inline"
                    assert env["valueFrom"]["secretKeyRef"]["name"], env["name"]
    config = _of_kind("ConfigMap")[0]["data"]["melo.toml"]
    for word in ("password", "token", "username"):
        assert f"{word} =" not in config, f"the ConfigMap sets a credential ({word})"


def test_writer_is_one_fenced_pod_per_model_with_grace_longer_than_a_block() -> None:
    writer = _deployment("writer")
    spec = writer["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    assert "melo.dev/model" in spec["selector"]["matchLabels"]
    env = {e["name"]: e.get("value") for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert env["MELO_MODEL"] == spec["selector"]["matchLabels"]["melo.dev/model"]
    assert env["MELO_KAFKA__GROUP_ID"].endswith(env["MELO_MODEL"]), "each model's writer needs its own consumer group"
    # A block trains for up to a few minutes on CPU; SIGKILL before it ends wastes the work.
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 300
    assert spec["template"]["spec"]["containers"][0]["args"][0] == "run"


def test_pdb_hpa_services_and_servicemonitor_point_at_existing_objects() -> None:
    writer, serve = _deployment("writer"), _deployment("serve")
    writer_labels = writer["spec"]["template"]["metadata"]["labels"]
    serve_labels = serve["spec"]["template"]["metadata"]["labels"]

    (pdb,) = _of_kind("PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], writer_labels)
    assert not _selects(pdb["spec"]["selector"]["matchLabels"], serve_labels)

    (hpa,) = _of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": serve["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    services = {s["metadata"]["name"]: s for s in _of_kind("Service")}
    assert set(services) == {"melo-serve", "melo-writer"}, "Service names are the Prometheus job names alerts use"
    for service, pod_labels, deployment in (("melo-serve", serve_labels, serve), ("melo-writer", writer_labels, writer)):
        spec = services[service]["spec"]
        assert _selects(spec["selector"], pod_labels), f"{service} selects no {service} pod"
        container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
        for port in spec["ports"]:
            assert port["targetPort"] in container_ports, f"{service} targets unknown port {port['targetPort']}"

    (monitor,) = _of_kind("ServiceMonitor")
    selected = [s for s in services.values() if _selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert {s["metadata"]["name"] for s in selected} == set(services)
    service_ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == service_ports


@pytest.mark.parametrize("component", ["writer", "serve"])
def test_configmap_and_deployment_env_make_valid_settings(component: str, tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "melo.toml"
    config.write_text(_of_kind("ConfigMap")[0]["data"]["melo.toml"])
    for env in _deployment(component)["spec"]["template"]["spec"]["containers"][0]["env"]:
        monkeypatch.setenv(env["name"], env.get("value", f"secret-for-{env['name'].lower()}"))
    settings = Settings.load(config)
    assert settings.kafka is not None and settings.kafka.security_protocol == "SASL_SSL"
    assert settings.kafka.sasl_password is not None
    assert settings.redis is not None and settings.redis.password is not None and settings.redis.tls
    assert settings.metrics.port == 9464 and settings.serve.port == 8080
    assert str(settings.data_dir) == "/var/lib/melo"
