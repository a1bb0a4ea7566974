"""What the ASGI and WSGI middlewares share, without I/O (`credici_redis.asgi`, `.wsgi`)."""
