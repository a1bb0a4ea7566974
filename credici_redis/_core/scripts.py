"""The Lua scripts: found on disk, includes expanded, hashed once at import; and the Functions
library made of them all.

Sources live in ``lua/`` at the top of the repository and ship inside the wheel as
``credici_redis/lua/``. A line ``--!include NAME`` is replaced by the file NAME, so shared
helpers (``_ledger.lua``) are written once.

Two ways to run them, the same code:
- The Functions library (`LIBRARY`, Redis 7+): every script is a function of one library, loaded
  once per server (``FUNCTION LOAD``), called by ``FCALL``. The helpers of ``_ledger.lua`` are
  defined once when the library loads, not again on every call. The library's name and its
  functions' carry a hash of its source, so two versions of credici-redis share a Redis.
- Scripts, by EVALSHA: where the library cannot be loaded (an ACL without FUNCTION, a Redis
  before 7), and for any call the server answered "function not found" or NOSCRIPT (after a
  restart, a flush or a failover), which the storages send again as EVAL of the script's source.
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
    function: str = ""
    """Its name in the Functions library (`LIBRARY`)."""


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


@dataclass(frozen=True)
class Library:
    """Every script as a function of one Redis Functions library."""

    name: str
    source: str

    def function(self, script: str) -> str:
        return f"{self.name}_{script}"


_SCRIPT_ONLY = re.compile(r"^.*--!script-only\s*$\n", re.MULTILINE)


def _library(directory: Path) -> Library:
    """One function per script of `directory` (not the ``_`` files, which are included): the
    shared file first, once, then each script's body as a local function, then the registration
    of each, which binds the call's KEYS and ARGV first. Lines marked ``--!script-only`` (the
    binding a script makes for itself) are left out."""
    shared = sorted({m for f in directory.glob("*.lua") for m in _INCLUDE.findall(_read(f))})
    names = sorted(f.stem for f in directory.glob("*.lua") if not f.name.startswith("_"))
    parts = ["local KEYS, ARGV\n"]
    parts += [_SCRIPT_ONLY.sub("", _read(directory / name)) for name in shared]
    for name in names:
        body = _INCLUDE.sub("", _read(directory / f"{name}.lua"))
        parts.append(f"local function run_{name}()\n{body}\nend\n")
    digest = hashlib.sha1("".join(parts).encode("utf-8")).hexdigest()[:12]
    library = f"credici_{digest}"
    for name in names:
        parts.append(
            f"redis.register_function('{library}_{name}', function(keys, args)\n"
            f"  KEYS, ARGV = keys, args\n  bind(keys)\n  return run_{name}()\nend)\n"
        )
    return Library(library, f"#!lua name={library}\n" + "".join(parts))


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


LIBRARY = _library(_lua_dir())
"""The Functions library of this version of credici-redis."""


def load(name: str, *, effect: bool, write: bool = True) -> Script:
    """The script lua/<name>.lua, includes expanded; loaded once per name."""
    source = _expand(_lua_dir(), f"{name}.lua")
    sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
    script = Script(name, source, sha, effect, write, LIBRARY.function(name))
    if LOADED.setdefault(name, script) != script:
        raise RuntimeError(f"credici-redis: script {name} loaded twice, differently")
    return script
