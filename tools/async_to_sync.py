"""Generate the sync modules from their asyncio sources (each pair below: SOURCE -> TARGET).

    python tools/async_to_sync.py          write every generated module
    python tools/async_to_sync.py --check  exit 1 if a generated module is not what it would write

Plain token rewriting (as psycopg's tools/async_to_sync.py does with an AST): `async def`,
`async with`, `async for` and `await` go, async names become their sync twins (each pair has its
rename table; a name may be dotted, e.g. ``asyncio.sleep``), lines marked `# async only` are
dropped, and a comment line ``# sync only: <code>`` becomes ``<code>``. The result is formatted
with ruff, so it reads like code written by hand.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "credici_redis"


@dataclass(frozen=True)
class Pair:
    source: Path
    target: Path
    what: str  # what the generated module is, for its docstring
    renames: dict[str, str]

    def header(self) -> str:
        source = self.source.relative_to(ROOT)
        return (
            f'"""{self.what}.\n\nGENERATED from {source} by tools/async_to_sync.py.\n'
            f"Do not edit: edit {source.name}, then run `python tools/async_to_sync.py`.\n"
            '"""\n'
        )


# Names every pair renames the same way.
COMMON = {
    "AsyncIterator": "Iterator",
    "aclose": "close",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "asyncio.sleep": "time.sleep",
}

PAIRS = [
    Pair(
        PACKAGE / "_clients/client_async.py",
        PACKAGE / "_clients/client_sync.py",
        "The sync client",
        {
            "AsyncCrediciClient": "CrediciClient",
            "AsyncStorage": "Storage",
            "AsyncArchiveReader": "ArchiveReader",
            "open_async_storage": "open_storage",
            **COMMON,
        },
    ),
    Pair(
        PACKAGE / "_storages/redis_async.py",
        PACKAGE / "_storages/redis_sync.py",
        "The sync Redis storage",
        {
            "AsyncRedisStorage": "RedisStorage",
            "AsyncArchiveSource": "ArchiveSource",
            "redis.asyncio": "redis",
            "async_primaries": "primaries",
            "async_send": "send",
            "Awaitable[Any]": "Any",
            "Awaitable[list[BalanceEvent]]": "list[BalanceEvent]",
            **COMMON,
        },
    ),
    Pair(
        PACKAGE / "_storages/postgres_async.py",
        PACKAGE / "_storages/postgres_sync.py",
        "The sync PostgreSQL storage",
        {
            "AsyncPostgresStorage": "PostgresStorage",
            "AsyncRedisStorage": "RedisStorage",
            "redis_async": "redis_sync",
            "AsyncStorage": "Storage",
            "_AsyncSession": "_Session",
            "_AsyncPool": "_Pool",
            "run_sql_async": "run_sql",
            "_execute_async": "_execute",
            "psycopg.AsyncConnection": "psycopg.Connection",
            **COMMON,
        },
    ),
    Pair(
        PACKAGE / "_archive/archive_async.py",
        PACKAGE / "_archive/archive_sync.py",
        "The sync archiver and archive reader",
        {
            "AsyncArchiver": "Archiver",
            "AsyncArchiveReader": "ArchiveReader",
            "AsyncRedisStorage": "RedisStorage",
            "redis_async": "redis_sync",
            "open_async_storage": "open_storage",
            "psycopg.AsyncConnection.connect": "psycopg.connect",
            "psycopg.AsyncConnection": "psycopg.Connection",
            **COMMON,
        },
    ),
]

_SYNC_ONLY = re.compile(r"^(\s*)# sync only: (.*)$")


def convert(source: str, pair: Pair) -> str:
    lines = [line for line in source.splitlines() if not line.rstrip().endswith("# async only")]
    lines = [_SYNC_ONLY.sub(r"\1\2", line) for line in lines]
    text = "\n".join(lines) + "\n"
    text = text[text.index('"""', 3) + 3 :].lstrip("\n")  # the module docstring is replaced
    text = re.sub(r"\basync def\b", "def", text)
    text = re.sub(r"\bawait ", "", text)
    text = re.sub(r"\basync with\b", "with", text)
    text = re.sub(r"\basync for\b", "for", text)
    for old, new in pair.renames.items():
        text = re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", new, text)
    return pair.header() + "\n" + text


def formatted(code: str, target: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(target), "-"],
        input=code,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    fixed = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--fix", "--quiet", "--stdin-filename",
         str(target), "-"],
        input=done.stdout,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )  # fmt: skip
    code = fixed.stdout or done.stdout
    again = subprocess.run(  # the fixes (unused imports dropped) may leave lines to re-join
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(target), "-"],
        input=code,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return again.stdout


def generated(pair: Pair) -> str:
    return formatted(convert(pair.source.read_text(encoding="utf-8"), pair), pair.target)


def main(argv: list[str]) -> int:
    stale = []
    for pair in PAIRS:
        code = generated(pair)
        if "--check" in argv:
            if not pair.target.exists() or pair.target.read_text(encoding="utf-8") != code:
                stale.append(pair)
            continue
        pair.target.write_text(code, encoding="utf-8")
    for pair in stale:
        print(f"{pair.target.relative_to(ROOT)} is out of date: run tools/async_to_sync.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
