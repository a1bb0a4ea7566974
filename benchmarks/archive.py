"""Archiver throughput: entries/s moved from Redis to PostgreSQL, against a bare copy.

    .venv/bin/python benchmarks/archive.py [--users 200] [--entries 50] [--rounds 3]
        [--redis-url URL] [--postgres-url URL]

Per round, `--users` users get `--entries` history entries each (adds and charges through the
library, pipelined), then:

- raw: the least any archiver must do, written with redis-py and psycopg directly: one XRANGE
  per user (pipelined per 200 users), the same INSERT rows (`_pg_history.history_row`) with
  `executemany`, one COMMIT per 200 users; nothing recorded in Redis, nothing trimmed;
- library: `Archiver(...).run_once()` with `keep=0`: finds the users through the slot outboxes,
  reads each user's unarchived entries with archive_pending.lua, inserts them (ON CONFLICT DO
  NOTHING), commits, then archive_done.lua moves the archived-up-to mark and trims the stream.

Both read the same entries (the raw copy goes first, into its own namespace's rows, which are
deleted). Figures are medians of `--rounds`; the ratio is library / raw. Every key and row
written is deleted at the end. Uses the Redis at 6379 and the PostgreSQL `test` database.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from datetime import timedelta

import psycopg
import redis

from credici_redis import CrediciClient
from credici_redis._core import keys as _keys
from credici_redis._core.protocol import stream_fields, text
from credici_redis._storages.pg_history import INSERT_HISTORY, history_row
from credici_redis.archive import Archiver, schema_sql

CHUNK = 200


def fill(client: CrediciClient, users: list[str], entries: int) -> None:
    for i in range(entries):
        if i % 2 == 0:
            client.add_many([(u, 10) for u in users])
        else:
            client.subtract_many([(u, 3) for u in users])


def raw_copy(
    r: redis.Redis, pg: psycopg.Connection, ns: str, copy_ns: str, users: list[str]
) -> int:
    copied = 0
    for start in range(0, len(users), CHUNK):
        chunk = users[start : start + CHUNK]
        pipe = r.pipeline(transaction=False)
        for u in chunk:
            pipe.xrange(_keys.user_keys(ns, u).history)
        streams = pipe.execute()
        rows = [
            history_row(copy_ns, u, (text(entry_id), stream_fields(fields)))
            for u, stream in zip(chunk, streams, strict=True)
            for entry_id, fields in stream
        ]
        with pg.transaction(), pg.cursor() as cur:
            cur.executemany(INSERT_HISTORY, rows)
        copied += len(rows)
    return copied


def delete_namespace(r: redis.Redis, ns: str) -> None:
    for key in r.scan_iter(match=f"{ns}:*", count=1000):
        r.unlink(key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--entries", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args(argv)
    r = redis.Redis.from_url(args.redis_url)
    pg = psycopg.connect(args.postgres_url, autocommit=True)
    with pg.transaction():
        pg.execute("SELECT pg_advisory_xact_lock(hashtext('credici_history'))")
        pg.execute(schema_sql())
    raw_rates: list[float] = []
    lib_rates: list[float] = []
    total = args.users * args.entries
    try:
        for round_ in range(args.rounds):
            ns = f"bench-arch-{secrets.token_hex(4)}"
            copy_ns = f"{ns}-copy"
            users = [f"user-{i}" for i in range(args.users)]
            try:
                with CrediciClient.from_url(args.redis_url, namespace=ns) as client:
                    fill(client, users, args.entries)
                started = time.perf_counter()
                copied = raw_copy(r, pg, ns, copy_ns, users)
                raw_seconds = time.perf_counter() - started
                assert copied == total, (copied, total)
                with Archiver(
                    args.redis_url, args.postgres_url, namespace=ns, keep=timedelta(0)
                ) as job:
                    job.init_schema()
                    started = time.perf_counter()
                    stats = job.run_once()
                    lib_seconds = time.perf_counter() - started
                assert (stats.entries, stats.trimmed) == (total, total), stats
                raw_rates.append(total / raw_seconds)
                lib_rates.append(total / lib_seconds)
                print(
                    f"round {round_ + 1}: raw {raw_rates[-1]:,.0f} entries/s, "
                    f"archiver {lib_rates[-1]:,.0f} entries/s",
                    file=sys.stderr,
                )
            finally:
                delete_namespace(r, ns)
                for name in (ns, copy_ns):
                    pg.execute("DELETE FROM credici_history WHERE namespace = %s", (name,))
    finally:
        r.close()
        pg.close()
    raw, lib = statistics.median(raw_rates), statistics.median(lib_rates)
    print(f"{args.users} users x {args.entries} entries = {total:,} entries, medians of "
          f"{args.rounds} rounds")  # fmt: skip
    print(f"{'':32} {'entries/s':>12} {'ratio':>7}")
    print(f"{'raw copy (XRANGE + INSERT)':32} {raw:>12,.0f} {'1.00':>7}")
    print(f"{'Archiver.run_once (keep=0)':32} {lib:>12,.0f} {lib / raw:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
