"""History rows in PostgreSQL, shared by the archiver (`archive`) and `PostgresStorage`: how a
Redis stream entry becomes a row of ``credici_history`` (``sql/history.sql``) and back.

PostgreSQL text cannot hold NUL, which user ids, keys and metadata may contain: such a value (or
one starting with the escape mark \\x01) is stored as \\x01 + its percent-encoding. The encoding is
injective, and every other value is stored as it is.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote

from psycopg.types.json import Jsonb

from credici_redis._core.protocol import entry_key, parse_entry

Entry = tuple[str, dict[str, str]]
"""A history entry: (entry id "<ms>-<seq>", its fields as written by the scripts)."""

INSERT_HISTORY = (
    "INSERT INTO credici_history (namespace, user_id, created_at, entry_seq, transaction_id,"
    " kind, amount, balance_after, expire_at, idempotency_key, metadata, fields)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


def pg_text(value: str) -> str:
    if "\x00" in value or value.startswith("\x01"):
        return "\x01" + quote(value, safe="")
    return value


def from_pg_text(value: str) -> str:
    return unquote(value[1:]) if value.startswith("\x01") else value


def pg_fields(fields: dict[str, str]) -> dict[str, str]:
    return {pg_text(k): pg_text(v) for k, v in fields.items()}


def from_pg_fields(fields: dict[str, str]) -> dict[str, str]:
    return {from_pg_text(k): from_pg_text(v) for k, v in fields.items()}


def history_row(namespace: str, user_id: str, entry: Entry) -> tuple[Any, ...]:
    """The parameters of INSERT_HISTORY for one entry."""
    tx = parse_entry(user_id, entry)
    key = None if tx.idempotency_key is None else pg_text(tx.idempotency_key)
    return (
        namespace, pg_text(user_id), tx.created_at, entry_key(entry[0])[1], tx.transaction_id,
        tx.kind, tx.amount, tx.balance_after, tx.expire_at, key, Jsonb(pg_fields(tx.metadata)),
        Jsonb(pg_fields(entry[1])),
    )  # fmt: skip
