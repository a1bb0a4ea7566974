"""The sync modules are generated from the asyncio ones; each must be up to date."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "async_to_sync.py"


def _load_tool() -> Any:
    spec = importlib.util.spec_from_file_location("async_to_sync", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def test_sync_client_is_generated_from_the_async_one() -> None:
    done = subprocess.run(
        [sys.executable, str(TOOL), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_generated_module_is_covered() -> None:
    package = ROOT / "credici_redis"
    assert {pair.target for pair in tool.PAIRS} == set(package.glob("**/*_sync.py"))
    assert {pair.source for pair in tool.PAIRS} == set(package.glob("**/*_async.py"))
    assert len(tool.PAIRS) == 4  # client, Redis storage, PostgreSQL storage, archive


@pytest.mark.parametrize("pair", tool.PAIRS, ids=lambda pair: pair.target.name)
def test_each_sync_module_is_generated_from_its_async_source(pair: Any) -> None:
    code = tool.generated(pair)
    assert pair.target.read_text(encoding="utf-8") == code, (
        f"{pair.target.name} is out of date: run tools/async_to_sync.py"
    )
    source = pair.source.relative_to(ROOT)
    assert f"GENERATED from {source} by tools/async_to_sync.py." in code.splitlines()[:4]
