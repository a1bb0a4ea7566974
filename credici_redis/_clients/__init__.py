"""The clients: the asyncio one (the source) and the sync one generated from it
(`credici_redis.client`)."""
