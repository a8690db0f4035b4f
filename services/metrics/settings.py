"""The metrics service's configuration: one typed object, validated at start.

Every setting comes from an environment variable `METRICS_<NAME>` (or an
optional env file), except the data folder, which the whole project shares
as `DEALLEDGER_DATA_DIR`. Unknown `METRICS_*` variables are refused, so a
misspelt setting is an error instead of a silent default.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from metrics.errors import ConfigurationError

__all__ = ["ENV_PREFIX", "Settings", "default_processes_dir", "load_settings"]

ENV_PREFIX = "METRICS_"
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def default_processes_dir() -> Path:
    """`schemas/processes` of the repository this package lives in."""
    return Path(__file__).resolve().parents[2] / "schemas" / "processes"


def _default_data_dir() -> Path:
    return Path.cwd() / "data"


class Settings(BaseSettings):
    """Configuration of the metrics service (env prefix `METRICS_`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        populate_by_name=True,
    )

    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the read-model database; default: the "
        "SQLite file metrics.db in the data folder.",
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        validation_alias=AliasChoices("DEALLEDGER_DATA_DIR", "data_dir"),
        description="Folder of the embedded SQLite database (DEALLEDGER_DATA_DIR).",
    )
    sqlite_busy_timeout_ms: int = Field(default=5000, ge=0)
    processes_dir: Path = Field(
        default_factory=default_processes_dir,
        description="Folder of the declared processes (*.yaml).",
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8001, ge=1, le=65535)
    api_token: SecretStr | None = Field(
        default=None,
        description="Bearer token the API requires; without it the API binds "
        "to loopback only.",
    )
    ops_token: SecretStr | None = Field(
        default=None,
        description="Bearer token of the ops scope: retrying parked events "
        "through the API needs it whenever a token is configured (it also "
        "reads what METRICS_API_TOKEN reads). With METRICS_API_TOKEN and "
        "without it, the retry endpoints refuse every request; with no token "
        "at all, the loopback-only API allows them.",
    )
    log_level: LogLevel = "INFO"

    batch_max_events: int = Field(
        default=10_000,
        ge=1,
        le=100_000,
        description="Events per projection transaction (Kafka). Larger batches "
        "write each deal row fewer times per event.",
    )

    feed_url: str = Field(default="http://127.0.0.1:8000", pattern=r"^https?://")
    feed_token: SecretStr | None = None
    feed_page_limit: int = Field(default=1000, ge=1, le=100_000)
    feed_poll_interval_ms: int = Field(default=200, ge=1)
    feed_timeout_ms: int = Field(default=5000, ge=1)
    feed_backoff_max_ms: int = Field(default=5000, ge=1)

    kafka_bootstrap: str = Field(default="127.0.0.1:9092", min_length=1)
    kafka_topic: str = Field(default="deal-events", pattern=r"^[A-Za-z0-9._-]{1,249}$")
    kafka_group: str = Field(default="metrics-projector", min_length=1)
    kafka_poll_timeout_ms: int = Field(default=500, ge=1)
    kafka_request_timeout_ms: int = Field(default=5000, ge=1000)
    kafka_session_timeout_ms: int = Field(
        default=45_000,
        ge=6_000,
        le=300_000,
        description="How long the consumer group waits for a projector that "
        "stopped answering before it hands that projector's partitions to "
        "another (kafka-python's default). Lower: a faster hand-over after a "
        "crash; too low for the machine: needless rebalances.",
    )
    kafka_reconnect_backoff_max_ms: int = Field(
        default=30_000,
        ge=50,
        description="The longest pause between two attempts to reach a broker "
        "that is down (kafka-python's default): how late after an outage "
        "the projector may notice the broker is back.",
    )
    kafka_check_crcs: bool = Field(
        default=False,
        description="Check the CRC-32C of every record batch fetched. Off by "
        "default: without the optional `crc32c` package kafka-python computes "
        "it in pure Python at about 8 MB/s, a third of the projector's time; "
        "the broker checks it when the batch is produced.",
    )

    @model_validator(mode="after")
    def _loopback_without_token(self) -> Settings:
        if self.api_token is None and not _is_loopback(self.host):
            raise ValueError(
                f"METRICS_HOST={self.host!r} is not a loopback address: binding "
                "beyond loopback requires METRICS_API_TOKEN"
            )
        return self

    @model_validator(mode="after")
    def _ops_token_of_its_own(self) -> Settings:
        if (
            self.ops_token is not None
            and self.api_token is not None
            and self.ops_token.get_secret_value() == self.api_token.get_secret_value()
        ):
            raise ValueError(
                "METRICS_OPS_TOKEN must differ from METRICS_API_TOKEN: the ops "
                "scope would be open to every reader"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to the SQLite file in the data folder."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'metrics.db'}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unknown_variables(environ: dict[str, str]) -> list[str]:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    return sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known
    )


def load_settings(env_file: Path | None = None, **overrides: Any) -> Settings:
    """Read and validate the settings, or raise `ConfigurationError` naming
    every setting that is wrong and the rule it breaks."""
    unknown = _unknown_variables(dict(os.environ))
    if unknown:
        raise ConfigurationError(
            "unknown settings: "
            + ", ".join(unknown)
            + " (known: "
            + ", ".join(ENV_PREFIX + n.upper() for n in Settings.model_fields)
            + ")"
        )
    if env_file is not None and not env_file.is_file():
        raise ConfigurationError(f"env file {env_file}: no such file")
    try:
        return Settings(_env_file=env_file, **overrides)
    except ValidationError as error:
        raise ConfigurationError(_describe(error)) from None


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"])
        name = (
            "DEALLEDGER_DATA_DIR"
            if location in {"data_dir", "DEALLEDGER_DATA_DIR"}
            else ENV_PREFIX + location.upper()
            if location
            else "settings"
        )
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{name}: {message}")
    return "invalid configuration: " + "; ".join(lines)
