"""PostgreSQL alone: the same ledger, with PostgreSQL as the only store (``postgresql://`` URLs).

One implementation of the ledger's rules: the Lua scripts. `PostgresStorage` drives the very
`Ledger` flows the Redis storages drive, and answers each script call inside one PostgreSQL
transaction:

1. lock the user (``INSERT ... ON CONFLICT DO NOTHING`` then ``SELECT ... FOR UPDATE`` of its row
   in ``credici_user_state``) and read PostgreSQL's clock, the user's state, the newest history
   entry (history ids keep growing; the audit compares it), the entry a reversal names, and the
   idempotency record, in one round trip;
2. load them into a private in-process Redis (fakeredis with Lua, one per connection) and run the
   script there, with PostgreSQL's time as the script's clock when the caller injected none;
3. write back what the script changed (the state, each new history entry as a row of
   ``credici_history``, new low-balance events, the idempotency record) and COMMIT, in one round
   trip. A script that answered with an error changes nothing (ROLLBACK).

History reads (``XRANGE``/``XREVRANGE`` of the flows) are range scans of ``credici_history``'s
primary key; ``TIME`` is PostgreSQL's clock; users and events have SQL of their own. Every step
is a generator of SQL batches (`SqlFlow`), stepped by a sync and an asyncio shell.
Tables: ``credici_redis/sql/history.sql`` and ``credici_redis/sql/postgres_storage.sql``.

The code: `_storages/postgres_async.py` holds `AsyncPostgresStorage`, from which
tools/async_to_sync.py generates `_storages/postgres_sync.py` (`PostgresStorage`); the SQL flows,
the pools and what else they share are in `_storages/postgres_base.py`. Import them from here.
"""

from __future__ import annotations

from credici_redis._core.extras import need_postgres

need_postgres("the PostgreSQL storage")

# Re-exported: the storages and what callers (and tests) reach through this module.
from credici_redis._storages.postgres_async import (  # noqa: F401, E402
    AsyncPostgresStorage,
    _execute_async,
    run_sql_async,
)
from credici_redis._storages.postgres_base import (  # noqa: F401, E402
    BEGIN,
    COMMIT,
    DEFAULT_POOL_SIZE,
    SCHEMA_FILES,
    TABLES,
    PostgresLedger,
    Rows,
    SqlBatch,
    SqlFlow,
    Statement,
    T,
    _AsyncPool,
    _AsyncSession,
    _Pool,
    _Session,
    create_schema,
    schema_statements,
)
from credici_redis._storages.postgres_sync import (  # noqa: F401, E402
    PostgresStorage,
    _execute,
    run_sql,
)

__all__ = ["AsyncPostgresStorage", "PostgresLedger", "PostgresStorage", "schema_statements"]
