"""The progression service's settings: environment variables, checked at start.

Every variable has the prefix `PROGRESSION_`, except the data folder, which
both services share as `DEALLEDGER_DATA_DIR`. A value that is wrong stops
the start with the variable's name and the rule it breaks.
"""

from __future__ import annotations

__all__ = ["Settings", "load_settings"]

from pathlib import Path

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigurationError

REPO_SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PROGRESSION_", extra="forbid", frozen=True
    )

    data_dir: Path = Field(
        default=Path("data"),
        validation_alias=AliasChoices("DEALLEDGER_DATA_DIR", "PROGRESSION_DATA_DIR"),
    )
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    schemas_dir: Path = REPO_SCHEMAS
    processes_dir: Path | None = None
    webhook_secrets: str = ""
    tokens: str = ""
    public_url: str | None = None
    max_body_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    batch_max_events: int = Field(default=1000, ge=1, le=10_000)
    signature_tolerance_s: int = Field(default=300, ge=1)
    feed_max_limit: int = Field(default=5000, ge=1)
    log_level: str = "INFO"
    log_format: str = Field(default="text", pattern="^(text|json)$")

    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_topic: str = "deal-events"
    kafka_partitions: int = Field(default=6, ge=1)
    kafka_replication_factor: int = Field(default=1, ge=1)
    relay_batch_size: int = Field(default=1000, ge=1)
    relay_poll_interval_ms: int = Field(default=200, ge=1)

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return level

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir.resolve() / 'progression.db'}"

    @property
    def resolved_processes_dir(self) -> Path:
        return self.processes_dir or self.schemas_dir / "processes"


def load_settings(**overrides: object) -> Settings:
    """Read the environment; a wrong value raises ConfigurationError naming it."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"PROGRESSION_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigurationError(f"invalid settings: {problems}") from exc
