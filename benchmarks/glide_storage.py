"""Issue 18 experiment: `AsyncRedisStorage` on valkey-glide's asyncio client. Not shipped code.

    /tmp/glidevenv/bin/python benchmarks/glide_trial.py          # the measurements
    CREDICI_TEST_STORAGE=benchmarks.glide_storage:make_storage \\
        /tmp/glidevenv/bin/python -m pytest tests/contract -k custom   # the contract suite on it

`GlideRedis` is a thin adapter that looks like the part of a ``redis.asyncio.Redis`` the storage
uses (``execute_command``, ``pipeline(transaction=False)`` with ``execute(raise_on_error=...)``,
``script_load``, ``aclose``) and sends every command with ``GlideClient.custom_command`` (a
pipeline: a non-atomic ``glide.Batch`` with ``raise_on_error=False``). Its replies are made what
redis-py (RESP2, ``decode_responses=False``) returns where the ledger reads them: glide answers
a status reply as ``str``, and XRANGE / XREVRANGE / XREADGROUP / XAUTOCLAIM as maps, INFO as
text. Its errors become redis-py's: an error reply becomes the ResponseError subclass redis-py
would have made of the same Redis error line (glide rewrites the line: "NOSCRIPT No matching
script" arrives as "An error was signalled by the server: - NoScriptError: No matching script",
"BUSYGROUP x" as "BUSYGROUP: x"); a lost connection, a timeout and a closed client become
redis.exceptions.ConnectionError / TimeoutError, so `storage_error` classifies them as before.

`GlideStorage` is `AsyncRedisStorage` on that adapter, with nothing else changed: the eviction
check (INFO memory), the Functions library loaded on "Function not found", the resend by source,
batching=True, one client per event loop (`connect=`). Single Redis only: no cluster; the
durability="replica" WAIT goes through the same pipeline and is untested here.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from glide import (
    AdvancedGlideClientConfiguration,
    Batch,
    GlideClient,
    GlideClientConfiguration,
    GlideError,
    NodeAddress,
    ProtocolVersion,
    RequestError,
)
from glide import ClosingError as GlideClosingError
from glide import ConnectionError as GlideConnectionError
from glide import TimeoutError as GlideTimeoutError
from redis import exceptions as redis_errors
from redis._parsers.base import BaseParser
from redis._parsers.helpers import parse_info

from credici_redis._storages.redis_async import AsyncRedisStorage

DEFAULT_TIMEOUT = 5.0

# --- errors ------------------------------------------------------------------------------------

_KIND_CODES = {  # redis-rs ErrorKind (Debug name) -> the Redis error code it was parsed from
    "ResponseError": "ERR",
    "ExecAbortError": "EXECABORT",
    "BusyLoadingError": "LOADING",
    "NoScriptError": "NOSCRIPT",
    "Moved": "MOVED",
    "Ask": "ASK",
    "TryAgain": "TRYAGAIN",
    "ClusterDown": "CLUSTERDOWN",
    "CrossSlot": "CROSSSLOT",
    "MasterDown": "MASTERDOWN",
    "ReadOnly": "READONLY",
    "NotBusy": "NOTBUSY",
    "TypeError": "WRONGTYPE",
}
_SIGNALLED = re.compile(r"An error was signalled by the server: - (\w+): (.*)", re.DOTALL)
_EXTENSION = re.compile(r"([A-Z][A-Z0-9_-]*): (.*)", re.DOTALL)  # an unknown code: "CODE: text"


def redis_line(message: str) -> str:
    """The Redis error line glide's message was made of ("NOSCRIPT No matching script...")."""
    found = _SIGNALLED.fullmatch(message)
    if found is not None and found[1] in _KIND_CODES:
        return f"{_KIND_CODES[found[1]]} {found[2]}"
    found = _EXTENSION.fullmatch(message)
    if found is not None:
        return f"{found[1]} {found[2]}"
    return message


def response_error(exc: RequestError) -> redis_errors.ResponseError:
    """An error reply as redis-py's parser makes it (NoScriptError, NoPermissionError, ...)."""
    error: Any = BaseParser.parse_error(redis_line(str(exc)))
    return error  # type: ignore[no-any-return]


def redis_error(exc: GlideError) -> Exception:
    """The redis-py exception for a glide failure (raised, never an error reply in place)."""
    if isinstance(exc, GlideTimeoutError):
        return redis_errors.TimeoutError(f"Timeout reading from Redis (glide: {exc})")
    if isinstance(exc, GlideConnectionError | GlideClosingError):
        return redis_errors.ConnectionError(f"Connection lost (glide: {exc})")
    if isinstance(exc, RequestError):
        return response_error(exc)
    return redis_errors.RedisError(f"glide: {exc}")


def in_place(reply: Any) -> Any:
    """A batch reply: an error reply becomes redis-py's exception; a failure of the connection
    (glide reports it per command in a batch) is raised, as a redis-py pipeline raises it."""
    if isinstance(reply, GlideTimeoutError | GlideConnectionError | GlideClosingError):
        raise redis_error(reply) from reply
    if isinstance(reply, RequestError):
        return response_error(reply)
    return reply


# --- replies -----------------------------------------------------------------------------------


def _entries(entries: Any) -> Any:
    """glide's {id: [[field, value], ...]} as redis-py's [(id, {field: value}), ...]."""
    if not isinstance(entries, dict):
        return entries
    return [(i, dict(fields) if fields is not None else None) for i, fields in entries.items()]


def _xread(reply: Any) -> Any:
    """XREADGROUP: {stream: {id: fields}} as [[stream, entries]]."""
    if not isinstance(reply, dict):
        return reply
    return [[stream, _entries(entries)] for stream, entries in reply.items()]


def _xautoclaim(reply: Any) -> Any:
    if isinstance(reply, list) and len(reply) >= 2:
        return [reply[0], _entries(reply[1]), *reply[2:]]
    return reply


def _info(reply: Any) -> Any:
    return parse_info(reply.decode() if isinstance(reply, bytes) else reply)


_CONVERT = {
    "XRANGE": _entries,
    "XREVRANGE": _entries,
    "XREADGROUP": _xread,
    "XAUTOCLAIM": _xautoclaim,
    "INFO": _info,
}


def converted(name: Any, reply: Any) -> Any:
    """What redis-py would return for this command's reply (only where they differ)."""
    if type(reply) is str:  # a status reply: redis-py (decode_responses=False) gives bytes
        return reply.encode()
    convert = _CONVERT.get(name.upper() if isinstance(name, str) else name)
    return reply if convert is None else convert(reply)


def _args(args: Iterable[Any]) -> list[str | bytes]:
    """glide takes str and bytes only."""
    return [a if type(a) is str or type(a) is bytes else str(a) for a in args]


# --- the adapter -------------------------------------------------------------------------------


class GlideRedis:
    """The part of redis.asyncio.Redis that AsyncRedisStorage uses, on one GlideClient
    (multiplexed: one connection carries every task's commands), made on first use in the
    running event loop."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 6379, *, db: int = 0,
        timeout: float = DEFAULT_TIMEOUT, protocol: ProtocolVersion = ProtocolVersion.RESP2,
    ) -> None:  # fmt: skip
        ms = max(1, round(timeout * 1000))
        self.config = GlideClientConfiguration(
            [NodeAddress(host, port)],
            database_id=db or None,
            request_timeout=ms,
            protocol=protocol,  # RESP2: Lua false is nil, as redis-py (RESP2) sees it
            advanced_config=AdvancedGlideClientConfiguration(connection_timeout=ms),
        )
        self.address = f"{host}:{port}"
        self._client: GlideClient | None = None
        self._creating: asyncio.Lock | None = None

    async def client(self) -> GlideClient:
        if self._client is not None:
            return self._client
        if self._creating is None:
            self._creating = asyncio.Lock()
        async with self._creating:
            if self._client is None:
                try:
                    self._client = await GlideClient.create(self.config)
                except GlideError as exc:  # nothing was sent: "connecting to" says so
                    raise redis_errors.ConnectionError(
                        f"Error connecting to {self.address} (glide: {exc})"
                    ) from exc
        return self._client

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if options:
            raise NotImplementedError(f"GlideRedis: no options ({sorted(options)}): no cluster")
        client = self._client or await self.client()
        try:
            reply = await client.custom_command(_args(args))
        except GlideError as exc:
            raise redis_error(exc) from exc
        return converted(args[0], reply)

    def pipeline(self, transaction: bool = False) -> GlidePipeline:
        if transaction:
            raise NotImplementedError("GlideRedis: pipelines only (transaction=False)")
        return GlidePipeline(self)

    async def script_load(self, source: str) -> Any:
        return await self.execute_command("SCRIPT", "LOAD", source)

    async def function_load(self, source: str, replace: bool = False) -> Any:
        return await self.execute_command(
            "FUNCTION", "LOAD", *(["REPLACE"] if replace else []), source
        )

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    close = aclose


class GlidePipeline:
    """A redis-py pipeline (transaction=False) as a non-atomic glide Batch."""

    def __init__(self, owner: GlideRedis) -> None:
        self._owner = owner
        self._commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> GlidePipeline:
        self._commands.append(args)
        return self

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        commands, self._commands = self._commands, []
        if not commands:
            return []
        batch = Batch(is_atomic=False)
        for args in commands:
            batch.custom_command(_args(args))
        client = self._owner._client or await self._owner.client()
        try:
            replies = await client.exec(batch, raise_on_error=False)
        except GlideError as exc:
            raise redis_error(exc) from exc
        assert replies is not None  # only an atomic batch answers None (a WATCH that failed)
        out = [converted(args[0], in_place(r)) for args, r in zip(commands, replies, strict=True)]
        if raise_on_error:
            for reply in out:
                if isinstance(reply, Exception):
                    raise reply
        return out


# --- the storage -------------------------------------------------------------------------------


class GlideStorage(AsyncRedisStorage):
    """AsyncRedisStorage whose "redis" is a GlideRedis: the same flows, errors and retries."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        namespace: str = "credici",
        *,
        db: int = 0,
        timeout: float = DEFAULT_TIMEOUT,
        **options: Any,
    ) -> None:
        connect = partial(GlideRedis, host, port, db=db, timeout=timeout)
        options.setdefault("owns_connection", True)
        super().__init__(connect(), namespace, connect=connect, **options)  # type: ignore[arg-type]

    @classmethod
    def from_url(cls, url: str, namespace: str = "credici", **options: Any) -> GlideStorage:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError("GlideStorage: redis://host[:port][/db] only")
        db = int(parts.path.strip("/") or 0)
        return cls(parts.hostname or "127.0.0.1", parts.port or 6379, namespace, db=db, **options)


# --- the contract suite's factory (CREDICI_TEST_STORAGE, docs/storage.md) ----------------------


def make_storage(namespace: str, *, asynchronous: bool, **options: Any) -> GlideStorage:
    """A GlideStorage on the test Redis (CREDICI_TEST_REDIS_URL); the sync API is skipped (this
    experiment has no sync storage: valkey-glide's sync client is another package)."""
    import pytest

    from tests.conftest import REDIS_URL

    if not asynchronous:
        pytest.skip("GlideStorage is asyncio only")
    return GlideStorage.from_url(REDIS_URL, namespace, **options)


# --- what the contract suite on the shared Redis does not reach ---------------------------------


async def _fault_checks() -> None:
    """On a redis-server of its own: the library missing (FUNCTION FLUSH there), EVALSHA's
    NOSCRIPT resend, the eviction refusal, a refused connection, a timeout with a write on the
    wire, a killed server, BUSY. Prints one line per check."""
    import contextlib
    import tempfile
    import time
    from pathlib import Path

    import redis

    from credici_redis import AsyncCrediciClient
    from credici_redis.errors import (
        EvictionPolicyError,
        OutcomeUnknownError,
        StorageUnavailableError,
    )
    from tests.conftest import free_port, start_redis_server

    def show(name: str, ok: bool, detail: object = "") -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")

    with tempfile.TemporaryDirectory() as tmp:
        port, server = start_redis_server(Path(tmp), "--enable-debug-command", "yes")
        raw = redis.Redis(port=port)
        try:
            raw.function_flush()  # a private server: nothing loaded
            client = AsyncCrediciClient(storage=GlideStorage(port=port, namespace="f"))
            tx = await client.add("u", 10)
            libs = raw.function_list()
            show("Function not found -> FUNCTION LOAD -> resent", bool(libs), tx.balance_after)

            client.storage.ledger.functions = False  # EVALSHA of a script the server lacks
            raw.script_flush()
            tx = await client.subtract("u", 1)
            show("NOSCRIPT -> resent by source (EVAL)", tx.balance_after == 9, tx.balance_after)
            client.storage.ledger.functions = True
            await client.aclose()

            raw.config_set("maxmemory-policy", "allkeys-lru")
            client = AsyncCrediciClient(storage=GlideStorage(port=port, namespace="f"))
            try:
                await client.get_balance("u")
                show("eviction policy refused", False, "no error")
            except EvictionPolicyError as exc:
                show("eviction policy refused", True, str(exc)[:60])
            await client.aclose()
            raw.config_set("maxmemory-policy", "noeviction")

            client = AsyncCrediciClient(storage=GlideStorage(port=port, namespace="f", timeout=0.5))
            await client.get_balance("u")
            slow = redis.Redis(port=port)
            sleeper = asyncio.get_running_loop().run_in_executor(
                None, lambda: slow.execute_command("DEBUG", "SLEEP", "1.5")
            )
            await asyncio.sleep(0.1)
            try:
                await client.subtract("u", 1)
                show("timeout with a write on the wire", False, "no error")
            except OutcomeUnknownError as exc:
                show("timeout with a write on the wire -> OutcomeUnknownError", True, exc.__cause__)
            except Exception as exc:
                show("timeout with a write on the wire", False, repr(exc))
            await sleeper
            try:
                await client.get_balance("u")
                show("client usable after the timeout", True)
            except Exception as exc:
                show("client usable after the timeout", False, repr(exc))

            busy = asyncio.get_running_loop().run_in_executor(
                None,
                lambda: slow.eval(
                    "local t = redis.call('TIME') while true do local n = redis.call('TIME') "
                    "if n[1] - t[1] >= 7 then break end end return 1",
                    0,
                ),
            )
            await asyncio.sleep(5.3)  # lua-time-limit is 5 s: BUSY afterwards
            try:
                await client.subtract("u", 1)
                show("BUSY (another script)", False, "no error")
            except StorageUnavailableError as exc:
                show("BUSY (another script) -> StorageUnavailableError", True, str(exc)[:70])
            except Exception as exc:
                show("BUSY (another script)", False, repr(exc))
            with contextlib.suppress(redis.RedisError):  # the busy script's own client
                await busy

            server.kill()
            server.wait()
            try:
                await client.subtract("u", 1)
                show("server killed", False, "no error")
            except (OutcomeUnknownError, StorageUnavailableError) as exc:
                show(f"server killed -> {type(exc).__name__}", True, exc.__cause__)
            await client.aclose()
        finally:
            server.kill()
            server.wait()

    client = AsyncCrediciClient(storage=GlideStorage(port=free_port(), namespace="f", timeout=1))
    started = time.monotonic()
    try:
        await client.get_balance("u")
        show("connection refused", False, "no error")
    except StorageUnavailableError as exc:
        took = time.monotonic() - started
        show("connection refused -> StorageUnavailableError", True, f"{took:.2f} s; {exc}")
    await client.aclose()


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    asyncio.run(_fault_checks())
