"""How a batch's changes reach the read-model tables: one statement per kind
of change, whatever the number of rows.

The rows are the projection's own records (dataclasses whose fields include
the table's columns). On PostgreSQL every statement takes all its rows as
one JSON array, which orjson writes straight from the dataclasses and
`json_populate_recordset` turns back into typed rows on the server: loading,
inserting and updating a thousand deals is one round trip each (`UPDATE ...
FROM json_populate_recordset(...)`), not a thousand, and no Python code runs
per value. Elsewhere (SQLite, in-process, where a statement costs no round
trip) the same changes go through SQLAlchemy Core as an executemany.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import sqlalchemy as sa

from metrics.tables import deals, stage_visits

__all__ = [
    "DEAL_COLUMNS",
    "VISIT_COLUMNS",
    "PortableWrites",
    "PostgresWrites",
    "Row",
    "VisitClosing",
    "Writes",
    "writes_for",
]

Row = tuple[Any, ...]

DEAL_COLUMNS: tuple[str, ...] = tuple(str(column.name) for column in deals.columns)
VISIT_COLUMNS: tuple[str, ...] = tuple(str(c.name) for c in stage_visits.columns)
_SELECT_CHUNK = 500


@dataclass(slots=True)
class VisitClosing:
    """How a visit stored by an earlier batch ended."""

    deal_id: str
    seq: int
    left_us: int
    left_to: str
    left_cause: str
    left_reason: str | None
    outcome: str
    duration_us: int


CLOSE_COLUMNS: tuple[str, ...] = VisitClosing.__slots__


class Writes(Protocol):
    """The statements a batch needs. A record is an object with an attribute
    per column: a deal's, a visit's or a `VisitClosing`."""

    def load_deals(
        self, connection: sa.Connection, deal_ids: Sequence[str]
    ) -> list[Row]:
        """The stored rows, in `DEAL_COLUMNS` order, of the deals that exist."""
        ...

    def insert_deals(self, connection: sa.Connection, records: Sequence[Any]) -> None:
        """Insert new deals."""
        ...

    def update_deals(self, connection: sa.Connection, records: Sequence[Any]) -> None:
        """Overwrite every column of stored deals."""
        ...

    def insert_visits(self, connection: sa.Connection, records: Sequence[Any]) -> None:
        """Insert new stage visits."""
        ...

    def close_visits(
        self, connection: sa.Connection, records: Sequence[VisitClosing]
    ) -> None:
        """Set how stored visits ended."""
        ...


def _as_dicts(
    records: Sequence[Any], names: Sequence[str], prefix: str = ""
) -> list[dict[str, Any]]:
    values: Callable[[Any], Row] = operator.attrgetter(*names)
    keys = [prefix + name for name in names]
    return [dict(zip(keys, values(record), strict=True)) for record in records]


class PortableWrites:
    """SQLAlchemy Core executemany: any database; the path SQLite takes."""

    def __init__(self) -> None:
        c = deals.c
        self._update_deal = (
            deals.update()
            .where(c.deal_id == sa.bindparam("b_deal_id"))
            .values({n: sa.bindparam(f"b_{n}") for n in DEAL_COLUMNS[1:]})
        )
        v = stage_visits.c
        self._close_visit = (
            stage_visits.update()
            .where(
                v.deal_id == sa.bindparam("b_deal_id"), v.seq == sa.bindparam("b_seq")
            )
            .values({n: sa.bindparam(f"b_{n}") for n in CLOSE_COLUMNS[2:]})
        )
        self._columns = [deals.c[name] for name in DEAL_COLUMNS]

    def load_deals(
        self, connection: sa.Connection, deal_ids: Sequence[str]
    ) -> list[Row]:
        found: list[Row] = []
        for start in range(0, len(deal_ids), _SELECT_CHUNK):
            chunk = list(deal_ids[start : start + _SELECT_CHUNK])
            query = sa.select(*self._columns).where(deals.c.deal_id.in_(chunk))
            found.extend(tuple(row) for row in connection.execute(query))
        return found

    def insert_deals(self, connection: sa.Connection, records: Sequence[Any]) -> None:
        connection.execute(deals.insert(), _as_dicts(records, DEAL_COLUMNS))

    def update_deals(self, connection: sa.Connection, records: Sequence[Any]) -> None:
        connection.execute(self._update_deal, _as_dicts(records, DEAL_COLUMNS, "b_"))

    def insert_visits(self, connection: sa.Connection, records: Sequence[Any]) -> None:
        connection.execute(stage_visits.insert(), _as_dicts(records, VISIT_COLUMNS))

    def close_visits(
        self, connection: sa.Connection, records: Sequence[VisitClosing]
    ) -> None:
        connection.execute(self._close_visit, _as_dicts(records, CLOSE_COLUMNS, "b_"))


def _record_set(table: sa.Table) -> str:
    """The rows of one JSON array of objects, typed as the table's rows: keys
    that are not columns are ignored, and a value too long for its column
    fails as it would in an INSERT."""
    return f"json_populate_recordset(NULL::{table.name}, %s::json) AS v"


class PostgresWrites:
    """One statement per kind of change, all its rows in one JSON parameter."""

    def __init__(self) -> None:
        deal_list = ", ".join(DEAL_COLUMNS)
        visit_list = ", ".join(VISIT_COLUMNS)
        self._load = f"SELECT {deal_list} FROM deals WHERE deal_id = ANY(%b::TEXT[])"
        self._insert_deals = (
            f"INSERT INTO deals ({deal_list}) "
            f"SELECT {deal_list} FROM {_record_set(deals)}"
        )
        self._update_deals = (
            "UPDATE deals AS d SET "
            + ", ".join(f"{n} = v.{n}" for n in DEAL_COLUMNS[1:])
            + f" FROM {_record_set(deals)} WHERE d.deal_id = v.deal_id"
        )
        self._insert_visits = (
            f"INSERT INTO stage_visits ({visit_list}) "
            f"SELECT {visit_list} FROM {_record_set(stage_visits)}"
        )
        self._close_visits = (
            "UPDATE stage_visits AS s SET "
            + ", ".join(f"{n} = v.{n}" for n in CLOSE_COLUMNS[2:])
            + f" FROM {_record_set(stage_visits)} "
            "WHERE s.deal_id = v.deal_id AND s.seq = v.seq"
        )

    def load_deals(
        self, connection: sa.Connection, deal_ids: Sequence[str]
    ) -> list[Row]:
        result = connection.exec_driver_sql(self._load, (list(deal_ids),))
        return [tuple(row) for row in result]

    @staticmethod
    def _send(
        connection: sa.Connection, statement: str, records: Sequence[Any]
    ) -> None:
        connection.exec_driver_sql(statement, (orjson.dumps(records).decode(),))

    def insert_deals(self, connection: sa.Connection, records: Sequence[Any]) -> None:
        self._send(connection, self._insert_deals, records)

    def update_deals(self, connection: sa.Connection, records: Sequence[Any]) -> None:
        self._send(connection, self._update_deals, records)

    def insert_visits(self, connection: sa.Connection, records: Sequence[Any]) -> None:
        self._send(connection, self._insert_visits, records)

    def close_visits(
        self, connection: sa.Connection, records: Sequence[VisitClosing]
    ) -> None:
        self._send(connection, self._close_visits, records)


def writes_for(engine: sa.Engine) -> Writes:
    """The JSON record sets on PostgreSQL, SQLAlchemy Core elsewhere."""
    if engine.dialect.name == "postgresql":
        return PostgresWrites()
    return PortableWrites()
