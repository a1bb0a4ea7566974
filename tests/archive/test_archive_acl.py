"""The archiver as the least-privilege ACL user of docs/security.md (`credici-archiver`), on a
redis-server of its own: it archives and trims everything, and without any one of its grants it
fails with a typed StorageError (the grants are sufficient and each is needed)."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

from credici_redis import CrediciClient, StorageError
from credici_redis.archive import Archiver
from credici_redis.errors import EvictionPolicyError, StorageUnavailableError
from tests.hostile.test_acl_tls import REFUSED, Server, acl_rules, acl_server, grants

__all__ = ["acl_server"]  # the fixture: a redis-server with ACLs, for this module

ARCHIVER_GRANTS = sorted(grants(acl_rules("credici-archiver")))


def archive_everything(server: Server, namespace: str, postgres_url: str, user: str) -> None:
    """Every path of the archiver: the scripts reloaded, a user archived in several rounds (the
    outbox keeps it between them), trimmed, the lag read, entries kept (the trim queue)."""
    server.set_user(f"w-{namespace}", acl_rules("credici", namespace))
    with CrediciClient.from_url(server.url(f"w-{namespace}"), namespace=namespace) as worker:
        for i in range(5):
            worker.add("a", 10 + i)
        worker.add("b", 1)
        server.admin.script_flush()
        url = server.url(user)
        with Archiver(url, postgres_url, namespace=namespace, keep=timedelta(0),
                      entries_per_user=2) as job:  # fmt: skip
            stats = job.run_once()
            assert (stats.entries, stats.trimmed) == (6, 6)
            assert job.lag().entries_pending == 0
        worker.subtract("a", 1)
        with Archiver(url, postgres_url, namespace=namespace, keep=timedelta(days=1)) as job:
            stats = job.run_once()
            assert (stats.entries, stats.trimmed) == (1, 0)  # kept a day
            assert job.lag().entries_pending == 0
        assert len(worker.get_all_user_transactions("a")) == 1


def test_the_archiver_user_archives_everything(
    acl_server: Server, namespace: str, pg: psycopg.Connection, postgres_url: str
) -> None:
    acl_server.set_user("credici-archiver", acl_rules("credici-archiver", namespace))
    archive_everything(acl_server, namespace, postgres_url, "credici-archiver")
    count = pg.execute(
        "SELECT count(*) FROM credici_history WHERE namespace = %s", (namespace,)
    ).fetchone()
    assert count == (7,)


@pytest.mark.parametrize("grant", ARCHIVER_GRANTS)
def test_every_archiver_grant_is_needed(
    acl_server: Server, namespace: str, pg: psycopg.Connection, postgres_url: str, grant: str
) -> None:
    user = f"archiver-without-{ARCHIVER_GRANTS.index(grant)}"
    rules = acl_rules("credici-archiver", namespace)
    acl_server.set_user(user, [rule for rule in rules if rule != grant])
    try:
        # Without +info the policy cannot be read: the storage refuses before anything else.
        refused = EvictionPolicyError if grant == "+info" else StorageError
        with pytest.raises(refused) as info:
            archive_everything(acl_server, namespace, postgres_url, user)
        assert not isinstance(info.value, StorageUnavailableError)
        assert REFUSED.search(str(info.value)), info.value
    finally:
        acl_server.admin.execute_command("ACL", "DELUSER", user)
