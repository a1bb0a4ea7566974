"""The Lua scripts: found on disk, includes expanded, hashed once at import.

Sources live in ``lua/`` at the top of the repository and ship inside the wheel as
``credici_redis/lua/``. A line ``--!include NAME`` is replaced by the file NAME, so shared
helpers (``_ledger.lua``) are written once. Scripts run by EVALSHA; the storages reload a script
when Redis answers NOSCRIPT (after a restart or SCRIPT FLUSH).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

_INCLUDE = re.compile(r"^--!include (\S+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str
    effect: bool
    """Carries out a caller's request: sent twice without an idempotency key, it applies twice.

    Scripts without an effect only bring a user up to now (expiry, renewal), which is the same
    however often it runs.
    """


def _lua_dir() -> Path:
    package = Path(__file__).resolve().parent.parent  # credici_redis/
    for candidate in (package / "lua", package.parent / "lua"):
        if (candidate / "_ledger.lua").is_file():
            return candidate
    raise RuntimeError(f"credici-redis: the Lua scripts are missing (looked in {package})")


def _expand(directory: Path, name: str, seen: tuple[str, ...] = ()) -> str:
    if name in seen:
        raise RuntimeError(f"credici-redis: include cycle through {name}")
    text = (directory / name).read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: _expand(directory, m.group(1), (*seen, name)), text)


def load(name: str, *, effect: bool) -> Script:
    source = _expand(_lua_dir(), f"{name}.lua")
    return Script(name, source, hashlib.sha1(source.encode("utf-8")).hexdigest(), effect)


ADD = load("add", effect=True)
SUBTRACT = load("subtract", effect=True)
BALANCE = load("balance", effect=False)
START_CYCLE = load("start_cycle", effect=True)
CYCLE = load("cycle", effect=False)
CANCEL_CYCLE = load("cancel_cycle", effect=True)
AUDIT = load("audit", effect=False)
DETAILS = load("details", effect=False)
SET_CREDIT_LIMIT = load("set_credit_limit", effect=False)  # setting it twice is setting it once

RESERVE = load("reserve", effect=True)
CAPTURE = load("capture", effect=True)
RELEASE = load("release", effect=False)  # a second release has no effect: safe to repeat
REVERSE = load("reverse", effect=True)
SET_LOW_BALANCE_THRESHOLD = load("set_low_balance_threshold", effect=False)

ARCHIVE_PENDING = load("archive_pending", effect=False)
ARCHIVE_DONE = load("archive_done", effect=False)  # compare-and-set on the archived-up-to id
ARCHIVE_SCAN = load("archive_scan", effect=False)
ARCHIVE_LAG = load("archive_lag", effect=False)

ALL = (
    ADD, SUBTRACT, BALANCE, START_CYCLE, CYCLE, CANCEL_CYCLE, AUDIT, DETAILS, SET_CREDIT_LIMIT,
    RESERVE, CAPTURE, RELEASE, REVERSE, SET_LOW_BALANCE_THRESHOLD, ARCHIVE_PENDING, ARCHIVE_DONE,
    ARCHIVE_SCAN, ARCHIVE_LAG,
)  # fmt: skip
