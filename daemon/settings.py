"""The daemon's whole configuration: one typed object, from a TOML file and `MELO_*` environment variables.

Precedence (highest first): environment, TOML file, defaults. Nested fields use "__" in the
environment (`MELO_KAFKA__BOOTSTRAP_SERVERS=broker:9092`, `MELO_BATCH__MAX_SIZE=8`) and tables in
TOML (`[kafka]`, `[batch]`). Every field carries a description: docs/configuration.md is generated
from them. Secrets are `SecretStr`: masked in repr, logs and `redacted()`.

With `kafka` unset the daemon reads the local spool directory; with `redis` unset it keeps its
records in a local store next to the snapshots (the embedded default).
"""

from __future__ import annotations

import ssl
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from schemas import MODEL_NAME, Limits


def names_a_checkpoint(backbone: str) -> bool:
    """Whether ``backbone`` is a path or ``hf:`` id (a user's checkpoint) rather than a shipped name."""
    return backbone.startswith(("hf:", ".", "~")) or "/" in backbone or backbone.endswith(".gguf")

if TYPE_CHECKING:
    import redis


class _Section(BaseModel):
    """A settings table: unknown keys are errors, so a typo never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid")


class BatchSettings(_Section):
    """How edits are grouped into one trained block."""

    max_size: int = Field(
        16, ge=1, le=4096, description="Edits per block: a batch is trained as soon as it holds this many."
    )
    max_wait_s: float = Field(
        5.0, gt=0, description="Train a partial batch once its oldest edit has waited this long (seconds)."
    )


class LimitsSettings(_Section):
    """Bounds on every incoming event; anything over goes to the DLQ with a reason code."""

    max_event_bytes: int = Field(
        64 * 1024, ge=256, le=16 * 1024 * 1024, description="Largest raw event accepted, in bytes."
    )
    max_prompt_chars: int = Field(
        2000,
        ge=1,
        le=20000,
        description=(
            "Longest prompt, rephrase or locality prompt, in characters. Edits must also fit the editor's token "
            "budget ([melo] max_length_tokens, 256 by default; prompt + target for decoder-only models): the "
            "writer checks it at intake and dead-letters an edit over it as `too_many_tokens`."
        ),
    )
    max_target_chars: int = Field(
        500,
        ge=1,
        le=20000,
        description="Longest target or locality expectation, in characters (and see the token budget above).",
    )
    max_rephrases: int = Field(8, ge=0, le=64, description="Most rephrases per edit.")
    max_locality: int = Field(16, ge=0, le=64, description="Most locality probes per edit.")
    max_metadata_bytes: int = Field(
        4096, ge=0, le=1024 * 1024, description="Largest metadata object, as compact UTF-8 JSON bytes."
    )

    def to_limits(self) -> Limits:
        """The `schemas.Limits` the validators take."""
        return Limits(**self.model_dump())


class TopicsSettings(_Section):
    """Kafka topic names (the same names are used as spool sub-directories)."""

    edits: str = Field("melo.edits", min_length=1, description="Edit events in, keyed by model.")
    control: str = Field(
        "melo.control", min_length=1, description="Control events in (rollback, retract, pause, resume)."
    )
    dlq: str = Field(
        "melo.edits.dlq", min_length=1, description="Rejected events out: original bytes plus a reason code."
    )
    results: str = Field(
        "melo.edit-results",
        min_length=1,
        description="Per-edit receipts out: applied in version v, duplicate, rejected, forgotten.",
    )
    forgotten: str = Field(
        "melo.forgotten",
        min_length=1,
        description="Edits forgotten because a newer conflicting edit shrank their cluster.",
    )
    snapshots: str = Field(
        "melo.snapshots", min_length=1, description="Announcements of newly published versions, for serving replicas."
    )


class KafkaSettings(_Section):
    """Connection to Apache Kafka (kafka-python). Unset = read the local spool directory instead."""

    bootstrap_servers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:9092"],
        min_length=1,
        description="Brokers as host:port; in the environment a comma-separated list.",
    )
    group_id: str | None = Field(
        None,
        min_length=1,
        description=(
            "Consumer group; default melo-writer-<model>. One group per model: a writer applies only its own "
            "model's events and commits past the others, so writers of different models must not share a group."
        ),
    )
    client_id: str = Field("melo", min_length=1, description="Client id shown in broker logs and quotas.")
    topics: TopicsSettings = Field(default_factory=TopicsSettings, description="Topic names.")
    session_timeout_ms: int = Field(
        45000, ge=1000, description="Group session timeout: a silent consumer is evicted after this long."
    )
    heartbeat_interval_ms: int = Field(
        3000, ge=100, description="Heartbeat period; keep it well under session_timeout_ms."
    )
    max_poll_interval_ms: int = Field(
        600000,
        ge=1000,
        description="Longest gap between polls before the consumer leaves its group "
        "(the worker keeps polling while it trains).",
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a group with no committed offset starts."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Transport security."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism, for SASL_* protocols."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (secret: prefer MELO_KAFKA__SASL_PASSWORD over the file)."
    )
    ssl_cafile: Path | None = Field(None, description="CA bundle that signs the brokers' certificates.")
    ssl_certfile: Path | None = Field(None, description="Client certificate, for mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="Client private key, for mutual TLS.")

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _split_servers(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _sasl_is_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                f"security_protocol={self.security_protocol} needs sasl_mechanism, sasl_username and sasl_password"
            )
        return self

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by kafka-python's KafkaConsumer, KafkaProducer and KafkaAdminClient."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = str(value)
        return kwargs

    def consumer_kwargs(self) -> dict[str, Any]:
        """KafkaConsumer kwargs: manual commits only (offsets move when a version is published)."""
        return self.client_kwargs() | {
            "group_id": self.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": self.auto_offset_reset,
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "max_poll_interval_ms": self.max_poll_interval_ms,
        }

    def producer_kwargs(self) -> dict[str, Any]:
        """KafkaProducer kwargs: every send waits for all in-sync replicas."""
        return self.client_kwargs() | {"acks": "all", "retries": 5}


class RedisSettings(_Section):
    """Redis for cluster records, applied edit ids and the writer lease. Unset = local record store."""

    url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL.")
    username: str | None = Field(None, description="ACL user name (overrides the URL's).")
    password: SecretStr | None = Field(None, description="Password (secret: prefer MELO_REDIS__PASSWORD).")
    tls: bool = Field(False, description="Use TLS even for a redis:// URL.")
    ssl_ca: Path | None = Field(None, description="CA bundle for TLS.")
    socket_timeout_s: float = Field(
        5.0, gt=0, description="Per-command socket timeout; a dead server fails within this."
    )
    lease_ttl_s: float = Field(
        30.0, gt=0, description="Writer lease lifetime: another daemon may take over this long after the writer dies."
    )
    lease_renew_s: float = Field(
        10.0, gt=0, description="How often the writer renews its lease; keep well under lease_ttl_s."
    )
    retry_deadline_s: float = Field(
        300.0,
        gt=0,
        description="How long the worker keeps retrying an unreachable Redis before it stops with an error.",
    )

    @model_validator(mode="after")
    def _renew_before_expiry(self) -> RedisSettings:
        if self.lease_renew_s >= self.lease_ttl_s:
            raise ValueError(f"lease_renew_s={self.lease_renew_s} must be shorter than lease_ttl_s={self.lease_ttl_s}")
        return self

    def client(self) -> redis.Redis:
        """A redis-py client for this server (bytes responses, bounded timeouts)."""
        import redis

        kwargs: dict[str, Any] = {
            "socket_timeout": self.socket_timeout_s,
            "socket_connect_timeout": self.socket_timeout_s,
        }
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password.get_secret_value()
        if self.tls or self.url.startswith("rediss://"):
            url = self.url.replace("redis://", "rediss://", 1)
            kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED
            if self.ssl_ca is not None:
                kwargs["ssl_ca_certs"] = str(self.ssl_ca)
        else:
            url = self.url
        return redis.Redis.from_url(url, **kwargs)


class MetricsSettings(_Section):
    """The Prometheus /metrics endpoint."""

    enabled: bool = Field(True, description="Serve /metrics.")
    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 to let Prometheus scrape from outside.")
    port: int = Field(9464, ge=0, le=65535, description="Port to bind (0 = any free port).")


class RetentionSettings(_Section):
    """Which snapshot versions the retention job deletes. CURRENT and pinned versions are always kept."""

    keep_last: int = Field(20, ge=1, description="Keep the newest this many versions.")
    keep_good: bool = Field(True, description="Also keep every version marked good.")
    interval_s: float = Field(600.0, gt=0, description="How often the retention job runs.")

    def keep_statuses(self) -> frozenset[str]:
        """Statuses whose versions retention never removes."""
        return frozenset({"pinned", "good"} if self.keep_good else {"pinned"})


class MonitorSettings(_Section):
    """Probes run against the serving version; a regression can roll back automatically."""

    interval_s: float = Field(300.0, gt=0, description="How often probes run.")
    locality_min: float = Field(
        0.9, ge=0, le=1, description="Lowest acceptable share of locality probes whose output is unchanged."
    )
    edits_min: float = Field(
        0.9, ge=0, le=1, description="Lowest acceptable share of applied edits still answered with their target."
    )
    canary_file: Path | None = Field(None, description="JSONL of {prompt, expected} probes that must always pass.")
    auto_rollback: bool = Field(
        False, description="Roll back to the last good version when a probe set falls below its minimum."
    )


class ServeSettings(_Section):
    """The HTTP serving and admin API."""

    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8080, ge=0, le=65535, description="Port to bind.")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for admin routes; unset = admin routes refused."
    )
    producer_token: SecretStr | None = Field(
        None,
        description="Bearer token for POST /v1/edits (and GET /v1/edits/{id}); unset = edits over HTTP refused. "
        "Must differ from admin_token.",
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest request body accepted.")
    max_rows: int = Field(
        64,
        ge=1,
        le=4096,
        description="Most prompts (or texts, or chat messages) in one /v1/generate, /v1/classify or OpenAI-compatible "
        "request, and most edit events in one POST /v1/edits.",
    )
    max_new_tokens: int = Field(
        64,
        ge=1,
        le=4096,
        description="Most tokens /v1/generate (max_new_tokens) or the OpenAI-compatible routes (max_tokens, also "
        "their default) may be asked to generate per row.",
    )
    control_wait_s: float = Field(
        30.0,
        ge=0,
        description="How long /v1/rollback and /v1/retract wait for the writer to publish before answering "
        "202 accepted (the request id then finds the version in /v1/versions).",
    )
    follow: Literal["announcements", "current"] = Field(
        "current", description="How replicas learn of new versions: the snapshots topic, or polling CURRENT."
    )
    poll_s: float = Field(2.0, gt=0, description="Polling period when follow = current.")
    max_status_wait_s: float = Field(
        120.0, ge=0, le=3600, description="Longest long-poll GET /v1/edits/{id}?wait=SECONDS may ask for."
    )

    @model_validator(mode="after")
    def _distinct_tokens(self) -> ServeSettings:
        if (
            self.producer_token is not None
            and self.admin_token is not None
            and self.producer_token.get_secret_value() == self.admin_token.get_secret_value()
        ):
            raise ValueError("serve.producer_token must differ from serve.admin_token: one token per role")
        return self


class Settings(BaseSettings):
    """Everything the daemon, the CLI and the serving process are configured with."""

    model_config = SettingsConfigDict(
        env_prefix="MELO_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    model: str = Field(
        "tiny-gpt2",
        pattern=MODEL_NAME.pattern,
        description="Model namespace: the Kafka key, the snapshot directory and the Redis hash tag.",
    )
    backbone: str | None = Field(
        None,
        description="Shipped backbone name, Hugging Face checkpoint directory, .gguf file or hf:<org>/<name> "
        "(local Hugging Face cache only); defaults to model. See docs/own-model.md.",
    )
    task: Literal["generate", "classify"] = Field(
        "generate", description="What edits teach: new continuations, or new labels."
    )
    labels: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Class labels for task = classify (comma-separated in the environment)."
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="Where the model runs and blocks are trained: auto (cuda when available), cpu, cuda or cuda:N.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Base weights' dtype (auto: float32 for shipped backbones, the checkpoint's own dtype for "
        "paths); block factors and their training stay float32.",
    )
    trust_remote_code: bool = Field(
        False, description="Let a checkpoint run its own Python code (transformers trust_remote_code); off by default."
    )
    melo: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of MeloConfig fields on top of the backbone's preset."
    )
    data_dir: Path = Field(Path("var/melo"), description="Root of everything the daemon writes.")
    snapshot_root: Path | None = Field(None, description="Snapshot store root; defaults to <data_dir>/snapshots.")
    records_dir: Path | None = Field(
        None, description="Local record store (used when redis is unset); defaults to <data_dir>/records."
    )
    spool_dir: Path | None = Field(
        None, description="Spool of JSONL event files (used when kafka is unset); defaults to <data_dir>/spool."
    )
    other_model_events: Literal["auto", "skip", "dead_letter"] = Field(
        "auto",
        description="Edit events naming another model: dead_letter = DLQ record and rejected receipt (reason "
        "wrong_model); skip = leave them to that model's writer; auto = dead_letter on the spool, skip on Kafka "
        "(where one edits topic carries every model's events).",
    )
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Micro-batching.")
    limits: LimitsSettings = Field(default_factory=LimitsSettings, description="Event size limits.")
    kafka: KafkaSettings | None = Field(None, description="Kafka connection; unset = local spool.")
    redis: RedisSettings | None = Field(None, description="Redis connection; unset = local record store.")
    metrics: MetricsSettings = Field(default_factory=MetricsSettings, description="Prometheus endpoint.")
    retention: RetentionSettings = Field(default_factory=RetentionSettings, description="Snapshot retention.")
    monitor: MonitorSettings = Field(default_factory=MonitorSettings, description="Probes and automatic rollback.")
    serve: ServeSettings = Field(default_factory=ServeSettings, description="HTTP API.")

    @field_validator("labels", mode="before")
    @classmethod
    def _split_labels(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _fill_derived_defaults(self) -> Settings:
        # Derived here, after the sources are merged, so MELO_DATA_DIR also moves the paths under it.
        if self.backbone is None:
            self.backbone = self.model
        if self.kafka is not None and self.kafka.group_id is None:
            self.kafka.group_id = f"melo-writer-{self.model}"
        if self.snapshot_root is None:
            self.snapshot_root = self.data_dir / "snapshots"
        if self.records_dir is None:
            self.records_dir = self.data_dir / "records"
        if self.spool_dir is None:
            self.spool_dir = self.data_dir / "spool"
        if self.task == "classify" and not self.labels and not names_a_checkpoint(self.backbone):
            # A checkpoint of the user's own carries its labels (id2label); a shipped one does not.
            raise ValueError("task = classify needs labels (e.g. MELO_LABELS=negative,positive)")
        return self

    @classmethod
    def load(cls, path: Path | None = None) -> Settings:
        """Settings from the TOML file at `path` (if given) with `MELO_*` environment variables on top.

        Raises FileNotFoundError naming the path, or pydantic's ValidationError naming each bad field.
        """
        file_values: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist: pass an existing TOML file or none")
            with path.open("rb") as handle:
                file_values = tomllib.load(handle)
        # Keyword arguments outrank the environment in pydantic-settings; merge the environment over
        # the file first so that the file ranks below it.
        env_values = EnvSettingsSource(cls)()
        return cls(**_deep_merge(file_values, env_values))

    def redacted(self) -> dict[str, Any]:
        """All settings as JSON-ready data with every secret masked (for `melo run` and logs)."""
        return self.model_dump(mode="json")


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
