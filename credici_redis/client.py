"""`CrediciClient` and `AsyncCrediciClient`: the public API of the seed README.

Each method validates its arguments into a request (`credici_redis._core.requests`, shared by both
clients), hands it to the storage, and returns what the storage parsed. Nothing else happens here.
The asyncio client is written once (`_clients/client_async.py`); the sync one is generated from it
(`_clients/client_sync.py`, by tools/async_to_sync.py), so the two cannot drift.
"""

from credici_redis._clients.base import AddItem, Clock, SubtractItem, UserId
from credici_redis._clients.client_async import AsyncCrediciClient
from credici_redis._clients.client_sync import CrediciClient

__all__ = ["AddItem", "AsyncCrediciClient", "Clock", "CrediciClient", "SubtractItem", "UserId"]
