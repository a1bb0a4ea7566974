"""The Lua sources: includes, headers, and what ships in the wheel."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from credici_redis._archive import base as archive_base
from credici_redis._core import scripts as _scripts
from credici_redis._ops import OPERATIONS
from tests.conftest import uv_command

ROOT = Path(__file__).resolve().parent.parent


def test_every_script_has_a_header_and_the_shared_helpers() -> None:
    for script in _scripts.LOADED.values():
        head = script.source.split("\n", 1)[0]
        assert head.startswith(f"--[[ {script.name}.lua:"), head
        assert "\n--!include " not in script.source  # expanded
        for section in ("KEYS", "ARGV", "Reply", "History"):
            assert section in script.source.split("]]", 1)[0], (script.name, section)
        if script.name not in ("archive_scan", "archive_lag"):  # read slots' queues
            assert "local function up_to_now(" in script.source


def test_every_lua_file_is_used() -> None:
    files = {p.stem for p in (ROOT / "lua").glob("*.lua")}
    assert files == {s.name for s in _scripts.LOADED.values()} | {"_ledger"}
    operations = {op.script.name for op in OPERATIONS.values()}
    archiver = {archive_base.ARCHIVE_PENDING.name, archive_base.ARCHIVE_DONE.name}
    archiver |= {archive_base.ARCHIVE_SCAN.name, archive_base.ARCHIVE_LAG.name}
    assert files == operations | archiver | {"_ledger"}


@pytest.mark.slow
def test_wheel_ships_the_scripts(tmp_path: Path) -> None:
    subprocess.run(
        [uv_command(), "build", "-q", "--wheel", "--out-dir", str(tmp_path), str(ROOT)],
        check=True,
        env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"},
    )
    (wheel,) = tmp_path.glob("credici_redis-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for script in (ROOT / "lua").glob("*.lua"):
        assert f"credici_redis/lua/{script.name}" in names
    assert "credici_redis/py.typed" in names
    for sql in (ROOT / "credici_redis" / "sql").glob("*.sql"):
        assert f"credici_redis/sql/{sql.name}" in names
