"""ops/compose.yaml: the laptop stack is complete, wired together, and configures melo by real settings."""

from __future__ import annotations

import re

import yaml

from tests.unit.test_ops_common import REPO_ROOT
from tests.unit.test_ops_config_doc import load_generator

OPS = REPO_ROOT / "ops"
COMPOSE = yaml.safe_load((OPS / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def _published(service: str) -> set[int]:
    return {int(str(p).split(":")[0]) for p in SERVICES[service].get("ports", [])}


def test_stack_has_kafka_redis_prometheus_grafana_writer_and_server() -> None:
    assert {"kafka", "kafka-init", "redis", "prometheus", "grafana", "melo-writer", "melo-serve"} <= SERVICES.keys()
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert "zookeeper" not in SERVICES


def test_published_ports_are_the_documented_ones() -> None:
    assert _published("kafka") == {9092}
    assert _published("redis") == {6379}
    assert _published("prometheus") == {9090}
    assert _published("grafana") == {3000}
    assert _published("melo-serve") == {8080}
    assert _published("melo-writer") == {9464}
    all_ports = [p for name in SERVICES for p in _published(name)]
    assert len(all_ports) == len(set(all_ports)), "two services publish the same host port"


def test_kafka_runs_kraft_with_internal_and_host_listeners() -> None:
    env = SERVICES["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "INTERNAL://kafka:19092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "EXTERNAL://localhost:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    script = SERVICES["kafka-init"]["command"][0]
    # Every topic name the daemon uses by default is created.
    for topic in ("melo.edits", "melo.control", "melo.edits.dlq", "melo.edit-results", "melo.forgotten", "melo.snapshots"):
        assert re.search(rf"create {re.escape(topic)} \d+", script), f"kafka-init does not create {topic}"
    edits = re.search(r"create melo\.edits (\d+)", script).group(1)
    control = re.search(r"create melo\.control (\d+)", script).group(1)
    assert edits == control, "edits and control need equal partition counts to be co-assigned per model"


def test_melo_services_are_configured_only_with_real_settings() -> None:
    known = load_generator().env_names()
    for name in ("melo-writer", "melo-serve"):
        service = SERVICES[name]
        assert service["build"]["dockerfile"] == "Dockerfile"
        assert (OPS / service["build"]["context"] / "Dockerfile").is_file()
        melo_env = {key for key in service["environment"] if key.startswith("MELO_")}
        assert melo_env, f"{name} sets no MELO_* settings"
        assert melo_env <= known, f"{name} sets unknown settings: {sorted(melo_env - known)}"
        assert "MELO_KAFKA__BOOTSTRAP_SERVERS" in melo_env and "MELO_REDIS__URL" in melo_env
        assert "melo-data:/var/lib/melo" in service["volumes"]
    assert SERVICES["melo-writer"]["command"] == ["run"]
    assert SERVICES["melo-serve"]["command"] == ["serve"]


def test_dependencies_and_mounts_resolve() -> None:
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", []):
            assert dependency in SERVICES, f"{name} depends on unknown service {dependency}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (OPS / source).exists(), f"{name} mounts {source}, which does not exist under ops/"
            else:
                assert source in COMPOSE["volumes"], f"{name} mounts undeclared volume {source}"


def test_prometheus_scrapes_the_compose_services_on_their_ports() -> None:
    config = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets["melo-writer"] == ["melo-writer:9464"]
    assert targets["melo-serve"] == ["melo-serve:8080"]
