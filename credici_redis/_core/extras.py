"""The pip extras and what needs them: a feature whose extra is missing raises
`MissingExtraError` naming the extra, instead of a bare ModuleNotFoundError from deep inside.

    embedded  fakeredis[lua]            ``memory://``, the demo, and PostgresStorage's scripts
    postgres  psycopg[binary] (+ fakeredis)  ``postgresql://`` storage, the archive
    web       starlette                 per-route prices of the ASGI middleware
    console   starlette, jinja2, uvicorn  the operator console (`credici_redis.console`, and
                                        the `credici-redis console` command that serves it)
    telemetry opentelemetry-api         metrics and spans (`credici_redis.telemetry.instrument`)
"""

from __future__ import annotations

import importlib
from types import ModuleType

from credici_redis.errors import MissingExtraError


def need(module: str, *, feature: str, extra: str) -> ModuleType:
    """Import `module`, or raise MissingExtraError if it (not something it imports) is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.partition(".")[0]
        if exc.name is None or exc.name.partition(".")[0] != top:
            raise
        raise MissingExtraError(feature, extra, top) from exc


def need_embedded(feature: str) -> ModuleType:
    """fakeredis, with the Lua runtime it needs to run the scripts (lupa)."""
    need("lupa", feature=feature, extra="embedded")
    return need("fakeredis", feature=feature, extra="embedded")


def need_postgres(feature: str) -> ModuleType:
    """psycopg, and fakeredis: PostgresStorage runs the same Lua scripts on a private one (the
    "postgres" extra brings both)."""
    psycopg = need("psycopg", feature=feature, extra="postgres")
    need("lupa", feature=feature, extra="postgres")
    need("fakeredis", feature=feature, extra="postgres")
    return psycopg
