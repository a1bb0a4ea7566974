-- credici-redis: the history table in PostgreSQL.
--
-- The archiver (credici_redis.archive) moves every user's history entries here out of Redis;
-- PostgresStorage (credici_redis.postgres) keeps its history here too. One row per history entry:
-- the entry id "<ms>-<seq>" is (created_at, entry_seq), so rows are keyed and ordered exactly as
-- the Redis stream was, and an insert of an entry already here changes nothing
-- (ON CONFLICT DO NOTHING): the archiver can re-send a batch after a crash without doubling it.
--
-- Reads of a user's history are index range scans on the primary key (namespace, user_id,
-- created_at, entry_seq), newest first with ORDER BY created_at DESC, entry_seq DESC.
-- Applied by `credici-redis archive --init` (or by the archiver's first run); safe to re-run.

CREATE TABLE IF NOT EXISTS credici_history (
    namespace       text        NOT NULL,
    user_id         text        NOT NULL,
    created_at      timestamptz NOT NULL,   -- the entry id's milliseconds
    entry_seq       bigint      NOT NULL,   -- the entry id's sequence number
    transaction_id  text        NOT NULL,   -- as Transaction.transaction_id
    kind            text        NOT NULL,   -- add, subtract, expire, cycle_start, reserve, ...
    amount          bigint      NOT NULL,   -- signed: + credits in, - credits out
    balance_after   bigint      NOT NULL,
    expire_at       timestamptz,
    idempotency_key text,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    fields          jsonb       NOT NULL,   -- the Redis stream entry's fields, as written
    archived_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, user_id, created_at, entry_seq)
);
