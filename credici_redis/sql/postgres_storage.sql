-- credici-redis: the tables of PostgresStorage (credici_redis.postgres), besides credici_history.
--
-- PostgresStorage runs the very Lua scripts the Redis storage runs, on a private in-process
-- Redis (fakeredis), one user at a time, inside a PostgreSQL transaction that holds the user's
-- row lock (SELECT ... FOR UPDATE on credici_user_state). Between operations a user's Redis keys
-- live in credici_user_state.state; the history entries the scripts write become rows of
-- credici_history (history.sql), their low-balance events rows of credici_events, their
-- idempotency records rows of credici_idempotency. See docs/postgres.md.
--
-- Applied by PostgresStorage on its first connection (under an advisory lock, so processes
-- starting together do not race); every statement is idempotent, safe to re-run.

-- One row per user: the lock every operation on the user takes, and the user's small state.
-- state: {"<key suffix>": {"hash": {field: value}} | {"zset": [[member, score], ...]}}, the
-- suffix being the part of the Redis key after "<namespace>:{<user>}:" (s, o, x, a, d, t).
-- '{}' for a user that was only read (never listed by scan_users).
CREATE TABLE IF NOT EXISTS credici_user_state (
    namespace  text        NOT NULL,
    user_id    text        NOT NULL,
    state      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, user_id)
);

-- Idempotency records: "<fingerprint>:<reply JSON>" as the scripts wrote it, kept until
-- expires_at (PostgreSQL's clock + the retention time). Expired rows are ignored, and a user's
-- are deleted by that user's next keyed write.
CREATE TABLE IF NOT EXISTS credici_idempotency (
    namespace  text        NOT NULL,
    user_id    text        NOT NULL,
    record_key text        NOT NULL,   -- the Redis key's suffix: "i:<idempotency key>"
    record     bytea       NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (namespace, user_id, record_key)
);

-- Low-balance events, written by the transaction of the change that caused them.
-- tx: the writing transaction's id. A reader takes only events of transactions older than every
-- transaction still running (txid_snapshot_xmin), in (tx, event_id) order, so an event committed
-- late is never skipped by a group's cursor.
CREATE TABLE IF NOT EXISTS credici_events (
    namespace      text        NOT NULL,
    event_id       bigint      GENERATED ALWAYS AS IDENTITY,
    tx             bigint      NOT NULL DEFAULT txid_current(),
    user_id        text        NOT NULL,
    kind           text        NOT NULL,   -- low_balance, depleted
    balance        bigint      NOT NULL,
    threshold      bigint      NOT NULL,
    transaction_id text        NOT NULL,
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (namespace, event_id)
);
CREATE INDEX IF NOT EXISTS credici_events_by_tx ON credici_events (namespace, tx, event_id);

-- A consumer group: every event after (tx, event_id) is still to be delivered to the group.
CREATE TABLE IF NOT EXISTS credici_event_groups (
    namespace  text   NOT NULL,
    group_name text   NOT NULL,
    tx         bigint NOT NULL DEFAULT 0,
    event_id   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, group_name)
);

-- Events delivered to a consumer of a group and not acknowledged yet; another consumer takes
-- one over once delivered_at is older than its claim_after.
CREATE TABLE IF NOT EXISTS credici_event_pending (
    namespace    text        NOT NULL,
    group_name   text        NOT NULL,
    event_id     bigint      NOT NULL,
    consumer     text        NOT NULL,
    delivered_at timestamptz NOT NULL,
    PRIMARY KEY (namespace, group_name, event_id)
);
