"""Where operations are carried out: the Redis storages (redis-py, fakeredis, Cluster), the
PostgreSQL storage, and opening one from a URL. Import them from `credici_redis.storage` and
`credici_redis.postgres`."""
