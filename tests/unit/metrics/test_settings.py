"""Configuration is validated at start, with the setting and the rule named."""

from __future__ import annotations

from pathlib import Path

import pytest

from metrics.cli import EXIT_CONFIGURATION, main
from metrics.errors import ConfigurationError, ProcessFileError
from metrics.processes import load_catalog
from metrics.settings import load_settings


def test_the_defaults_are_an_sqlite_file_in_the_data_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DEALLEDGER_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'metrics.db'}"
    assert (settings.host, settings.port) == ("127.0.0.1", 8001)
    assert settings.processes_dir.parts[-2:] == ("schemas", "processes")


def test_a_port_out_of_range_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("METRICS_PORT", "70000")
    with pytest.raises(ConfigurationError, match=r"METRICS_PORT: .*65535"):
        load_settings()


def test_a_misspelt_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_FEED_ULR", "http://x")
    with pytest.raises(ConfigurationError, match="METRICS_FEED_ULR"):
        load_settings()


def test_binding_beyond_loopback_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_HOST", "0.0.0.0")
    with pytest.raises(ConfigurationError, match="METRICS_API_TOKEN"):
        load_settings()
    monkeypatch.setenv("METRICS_API_TOKEN", "s3cret-token")
    assert load_settings().host == "0.0.0.0"


def test_a_missing_processes_folder_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ProcessFileError, match="METRICS_PROCESSES_DIR"):
        load_catalog(tmp_path / "nowhere")


def test_a_process_file_with_a_bad_stage_names_the_file_and_the_field(
    tmp_path: Path,
) -> None:
    (tmp_path / "p.yaml").write_text(
        "key: p\nversion: 1\nstages:\n  - {key: a, expected_days: -1, "
        "win_probability: 0.1}\n"
    )
    with pytest.raises(ProcessFileError, match=r"p.yaml: /stages/0/expected_days"):
        load_catalog(tmp_path)


def test_the_command_exits_2_on_bad_configuration(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("METRICS_LOG_LEVEL", "LOUD")
    assert main(["migrate"]) == EXIT_CONFIGURATION
    err = capsys.readouterr().err
    assert "level=ERROR" in err
    assert "METRICS_LOG_LEVEL: Input should be 'DEBUG'" in err


def test_migrate_creates_the_read_models(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DEALLEDGER_DATA_DIR", str(tmp_path / "data"))
    assert main(["migrate"]) == 0
    assert (tmp_path / "data" / "metrics.db").is_file()


def test_the_ops_token_is_a_setting_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_OPS_TOKEN", "ops-token-0123")
    settings = load_settings()
    assert settings.ops_token is not None
    assert settings.ops_token.get_secret_value() == "ops-token-0123"
    monkeypatch.setenv("METRICS_API_TOKEN", "ops-token-0123")
    with pytest.raises(ConfigurationError, match="METRICS_OPS_TOKEN must differ"):
        load_settings()


def test_a_session_timeout_below_what_brokers_accept_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Brokers refuse sessions under 6 s (group.min.session.timeout.ms).
    monkeypatch.setenv("METRICS_KAFKA_SESSION_TIMEOUT_MS", "1000")
    with pytest.raises(
        ConfigurationError, match=r"METRICS_KAFKA_SESSION_TIMEOUT_MS: .*6000"
    ):
        load_settings()
    monkeypatch.setenv("METRICS_KAFKA_SESSION_TIMEOUT_MS", "10000")
    assert load_settings().kafka_session_timeout_ms == 10_000
