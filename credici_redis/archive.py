"""The history archive: Redis Streams -> PostgreSQL, and one seamless history read across both.

History cannot stay in Redis memory for ever. The `Archiver` copies every user's history entries
into the PostgreSQL table of ``credici_redis/sql/history.sql`` and lets Redis forget what
PostgreSQL holds; a client made with ``archive_url=`` reads both as one history.

Finding the work without scanning users: every script that appends to a user's history also
marks the user in the *outbox* of its Redis Cluster slot (``<ns>:{%S<x>}:ob``, a zset: history
key -> ms of its oldest entry not yet archived), in the same atomic script. A pass visits the
16384 slot outboxes (pipelined, per node on a cluster), never the users, and only the users with
something new. No script crosses a slot, so it works the same on Redis Cluster.

One user, one pass (nothing lost, nothing doubled):
  1. ``archive_pending.lua`` returns the entries after the user's archived-up-to id (``ar``).
  2. They are inserted into PostgreSQL with ON CONFLICT DO NOTHING (the key is the entry id), and
     committed.
  3. ``archive_done.lua`` moves ``ar`` to the last committed id, only if ``ar`` is still what step
     1 read (another archiver may have got there first), and trims the entries up to ``ar`` that
     are older than ``keep``: Redis forgets only what PostgreSQL has committed.
A crash between 2 and 3 leaves ``ar`` where it was: the next pass inserts the same rows again,
which changes nothing. Entries kept for ``keep`` (reverse needs them) wait in the slot's trim
queue (``<ns>:{%S<x>}:tq``) for their time.

Reads: `ArchiveReader` / `AsyncArchiveReader` (what ``archive_url=`` makes) return the archived
part of a history; the client reads Redis first, then PostgreSQL, and merges by transaction id:
an entry trimmed between the two reads was committed before it was trimmed, so it is in the
second, and an entry in both is returned once.

The code: the flows and the SQL in `_archive/base.py`; `AsyncArchiver` and `AsyncArchiveReader`
in `_archive/archive_async.py`, from which tools/async_to_sync.py generates `Archiver` and
`ArchiveReader` (`_archive/archive_sync.py`). Import them from here.
"""

from credici_redis._core.extras import need

need("psycopg", feature="the archive", extra="postgres")

from credici_redis._archive.archive_async import AsyncArchiver, AsyncArchiveReader  # noqa: E402
from credici_redis._archive.archive_sync import Archiver, ArchiveReader  # noqa: E402
from credici_redis._archive.base import (  # noqa: E402
    DEFAULT_KEEP,
    SLOTS_PER_ROUND,
    ArchiveLag,
    ArchiveStats,
    merge,
    schema_sql,
)

__all__ = [
    "DEFAULT_KEEP",
    "SLOTS_PER_ROUND",
    "ArchiveLag",
    "ArchiveReader",
    "ArchiveStats",
    "Archiver",
    "AsyncArchiveReader",
    "AsyncArchiver",
    "merge",
    "schema_sql",
]
