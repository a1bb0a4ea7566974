"""The Lua scripts: found on disk, includes expanded, hashed once at import.

Sources live in ``lua/`` at the top of the repository and ship inside the wheel as
``credici_redis/lua/``. A line ``--!include NAME`` is replaced by the file NAME, so shared
helpers (``_ledger.lua``) are written once. Scripts run by EVALSHA; when Redis answers NOSCRIPT
(after a restart, SCRIPT FLUSH or a failover) the storages send the script's source (EVAL).
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
    write: bool = True
    """A write the caller is told about: with durability="replica", a WAIT follows it. A read
    (balance, details...) writes only what any later call would write again: no WAIT."""


LOADED: dict[str, Script] = {}
"""Every script loaded so far, by name (the operations and the archiver load theirs)."""


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


def load(name: str, *, effect: bool, write: bool = True) -> Script:
    """The script lua/<name>.lua, includes expanded; loaded once per name."""
    source = _expand(_lua_dir(), f"{name}.lua")
    script = Script(name, source, hashlib.sha1(source.encode("utf-8")).hexdigest(), effect, write)
    if LOADED.setdefault(name, script) != script:
        raise RuntimeError(f"credici-redis: script {name} loaded twice, differently")
    return script
