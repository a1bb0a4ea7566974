"""`CrediciClient` and `AsyncCrediciClient`: the public API of the seed README.

Each method validates its arguments into a request (`credici_redis._requests`, shared by both
clients), hands it to the storage, and returns what the storage parsed. Nothing else happens here.
The asyncio client is written once (`_async_client.py`); the sync one is generated from it
(`_sync_client.py`, by tools/async_to_sync.py), so the two cannot drift.
"""

from credici_redis._async_client import AsyncCrediciClient
from credici_redis._client_base import AddItem, Clock, SubtractItem, UserId
from credici_redis._sync_client import CrediciClient

__all__ = ["AddItem", "AsyncCrediciClient", "Clock", "CrediciClient", "SubtractItem", "UserId"]
