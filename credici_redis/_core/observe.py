"""What a storage tells telemetry of its inner steps (`credici_redis.telemetry` listens).

The default observer hears nothing and costs one method call per step; `Ledger.observer` holds
the one in use (shared by the storage's calls, its retries and its event polling)."""

from __future__ import annotations


class Observer:
    """The steps a storage reports; each method does nothing here."""

    def catch_up_step(self, script: str) -> None:
        """`script` replied CATCHUP: one bounded step of a long catch-up was applied, the
        call goes again."""

    def retry(self) -> None:
        """A call met an outage (StorageUnavailableError) and goes again (`retries=`)."""

    def events_read(self, kinds: list[str]) -> None:
        """Events handed to this process's consumer (`client.events()`), one kind each."""

    def events_acknowledged(self, count: int) -> None:
        """`count` events this process was handed are acknowledged (handled)."""


QUIET = Observer()
