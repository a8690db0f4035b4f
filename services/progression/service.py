"""The composition root: settings in, a ready progression service out.

Start-up checks everything before the first request: the settings, every
process file against the process schema, the database schema (migrated to
head), and that no process changed under an old version number.
"""

from __future__ import annotations

__all__ = ["Service"]

import logging
from dataclasses import dataclass

import sqlalchemy as sa

from .contract import Contract
from .db import create_engine, migrate
from .errors import ConfigurationError
from .eventlog import EventLog
from .ingestion import Ingestion
from .process import Process, ProcessCatalog, load_process_dir, parse_process
from .security import TokenTable, WebhookSecret, parse_tokens, parse_webhook_secrets
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Service:
    settings: Settings
    engine: sa.Engine
    log: EventLog
    catalog: ProcessCatalog
    contract: Contract
    ingestion: Ingestion
    tokens: TokenTable
    webhook_secrets: dict[str, WebhookSecret]

    @property
    def credentials_configured(self) -> bool:
        return bool(len(self.tokens) or self.webhook_secrets)

    @classmethod
    def start(cls, settings: Settings, *, engine: sa.Engine | None = None) -> Service:
        try:
            tokens = parse_tokens(settings.tokens)
            secrets = parse_webhook_secrets(settings.webhook_secrets)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc

        contract = Contract(settings.schemas_dir)
        files = load_process_dir(
            settings.resolved_processes_dir, contract.process_schema
        )

        if engine is None:
            if settings.database_url is None:
                settings.data_dir.mkdir(parents=True, exist_ok=True)
            engine = create_engine(settings.resolved_database_url)
        migrate(engine)
        event_log = EventLog(engine)

        # Every version a deal was ever decided by stays loadable from the log;
        # the files on disk name the current version of each key.
        for process in files:
            event_log.register_process(
                process.key, process.version, dict(process.definition), process.digest
            )

        def recorded() -> list[Process]:
            return [
                parse_process(
                    stored.definition,
                    contract.process_schema,
                    f"recorded process {stored.key} v{stored.version}",
                )
                for stored in event_log.processes()
            ]

        catalog = ProcessCatalog(reload=recorded)
        for process in recorded():
            catalog.add(process)
        for process in files:
            catalog.add(process, current=True)

        return cls(
            settings=settings,
            engine=engine,
            log=event_log,
            catalog=catalog,
            contract=contract,
            ingestion=Ingestion(event_log, catalog, contract),
            tokens=tokens,
            webhook_secrets=secrets,
        )
