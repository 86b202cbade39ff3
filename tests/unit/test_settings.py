"""Settings: defaults, TOML file, MELO_* environment on top, secrets never shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.settings import Settings
from schemas import Limits


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MELO_"):
            monkeypatch.delenv(name)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "melo.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_embedded_setup_with_paths_under_data_dir() -> None:
    settings = Settings.load(None)
    assert settings.kafka is None and settings.redis is None
    assert settings.backbone == settings.model == "tiny-gpt2"
    assert settings.snapshot_root == Path("var/melo/snapshots")
    assert settings.spool_dir == Path("var/melo/spool")
    assert settings.limits.to_limits() == Limits()


def test_environment_overrides_file_which_overrides_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(
        tmp_path,
        """
model = "from-file"
data_dir = "/srv/melo"
[batch]
max_size = 4
max_wait_s = 9.5
[kafka]
bootstrap_servers = ["file:9092"]
group_id = "file-group"
[kafka.topics]
edits = "team.edits"
""",
    )
    monkeypatch.setenv("MELO_BATCH__MAX_SIZE", "32")
    monkeypatch.setenv("MELO_KAFKA__GROUP_ID", "env-group")
    monkeypatch.setenv("MELO_DATA_DIR", "/data")
    settings = Settings.load(path)
    assert settings.model == "from-file"
    assert (settings.batch.max_size, settings.batch.max_wait_s) == (32, 9.5)
    assert settings.kafka.group_id == "env-group"
    assert settings.kafka.bootstrap_servers == ["file:9092"]  # sibling keys of an env override survive
    assert settings.kafka.topics.edits == "team.edits" and settings.kafka.topics.dlq == "melo.edits.dlq"
    assert settings.snapshot_root == Path("/data/snapshots")  # derived from the winning data_dir


def test_environment_alone_can_enable_kafka_with_a_comma_separated_broker_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MELO_KAFKA__BOOTSTRAP_SERVERS", "a:9092, b:9093")
    monkeypatch.setenv("MELO_LABELS", "negative,positive")
    monkeypatch.setenv("MELO_TASK", "classify")
    settings = Settings.load(None)
    assert settings.kafka.bootstrap_servers == ["a:9092", "b:9093"]
    assert settings.labels == ["negative", "positive"]


def test_secrets_are_masked_in_repr_str_and_redacted_dump(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MELO_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("MELO_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("MELO_KAFKA__SASL_USERNAME", "melo")
    monkeypatch.setenv("MELO_KAFKA__SASL_PASSWORD", "hunter2-kafka")
    monkeypatch.setenv("MELO_REDIS__PASSWORD", "hunter2-redis")
    monkeypatch.setenv("MELO_SERVE__ADMIN_TOKEN", "hunter2-admin")
    settings = Settings.load(None)
    for text in (repr(settings), str(settings), str(settings.redacted())):
        assert "hunter2" not in text
    assert settings.kafka.client_kwargs()["sasl_plain_password"] == "hunter2-kafka"
    assert settings.serve.admin_token.get_secret_value() == "hunter2-admin"


def test_consumer_kwargs_disable_auto_commit_and_carry_group_timeouts() -> None:
    settings = Settings(kafka={"bootstrap_servers": "k:9092", "max_poll_interval_ms": 900000})
    kwargs = settings.kafka.consumer_kwargs()
    assert kwargs["enable_auto_commit"] is False
    assert kwargs["bootstrap_servers"] == ["k:9092"] and kwargs["max_poll_interval_ms"] == 900000
    assert "sasl_mechanism" not in kwargs


def test_redis_client_is_built_from_url_and_credentials() -> None:
    settings = Settings(
        redis={"url": "redis://127.0.0.1:1/3", "username": "u", "password": "p", "socket_timeout_s": 0.5}
    )
    client = settings.redis.client()
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"], kwargs["socket_timeout"]) == (3, "u", "p", 0.5)


@pytest.mark.parametrize(
    "text",
    [
        "[batch]\nmax_sise = 3\n",  # typo
        'model = "../escape"\n',
        'task = "classify"\n',  # no labels
        "[redis]\nlease_ttl_s = 5\nlease_renew_s = 5\n",
        '[kafka]\nsecurity_protocol = "SASL_SSL"\n',  # no credentials
    ],
)
def test_invalid_files_are_refused_naming_the_field(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValidationError):
        Settings.load(write_toml(tmp_path, text))


def test_missing_config_file_is_an_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.toml"):
        Settings.load(tmp_path / "nope.toml")


def test_every_field_is_documented() -> None:
    def check(model: type) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            for candidate in getattr(annotation, "__args__", (annotation,)):
                if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
                    check(candidate)

    check(Settings)


def test_redis_tls_switches_to_verified_ssl_connections(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    settings = Settings(redis={"url": "redis://cache:6380/0", "tls": True, "ssl_ca": ca})
    pool = settings.redis.client().connection_pool
    assert pool.connection_class.__name__ == "SSLConnection"
    assert pool.connection_kwargs["ssl_ca_certs"] == str(ca)


def test_serve_request_limits_and_control_wait_have_defaults_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    serve = Settings.load(None).serve
    assert (serve.max_rows, serve.max_new_tokens, serve.control_wait_s) == (64, 64, 30.0)
    monkeypatch.setenv("MELO_SERVE__MAX_ROWS", "8")
    monkeypatch.setenv("MELO_SERVE__CONTROL_WAIT_S", "0")
    serve = Settings.load(None).serve
    assert (serve.max_rows, serve.control_wait_s) == (8, 0.0)
    monkeypatch.setenv("MELO_SERVE__MAX_NEW_TOKENS", "0")
    with pytest.raises(ValidationError, match="max_new_tokens"):
        Settings.load(None)


def test_producer_token_comes_from_the_environment_and_must_differ_from_the_admin_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MELO_SERVE__PRODUCER_TOKEN", "p-secret")
    settings = Settings()
    assert settings.serve.producer_token is not None
    assert settings.serve.producer_token.get_secret_value() == "p-secret"
    assert "p-secret" not in repr(settings)
    monkeypatch.setenv("MELO_SERVE__ADMIN_TOKEN", "p-secret")
    with pytest.raises(ValidationError, match="producer_token must differ"):
        Settings()
