"""The Lua sources: includes, headers, and what ships in the wheel."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from credici_redis._core import scripts as _scripts
from tests.conftest import uv_command

ROOT = Path(__file__).resolve().parent.parent


def test_every_script_has_a_header_and_the_shared_helpers() -> None:
    for script in _scripts.ALL:
        head = script.source.split("\n", 1)[0]
        assert head.startswith(f"--[[ {script.name}.lua:"), head
        assert "\n--!include " not in script.source  # expanded
        for section in ("KEYS", "ARGV", "Reply", "History"):
            assert section in script.source.split("]]", 1)[0], (script.name, section)
        if script not in (_scripts.ARCHIVE_SCAN, _scripts.ARCHIVE_LAG):  # read slots' queues
            assert "local function up_to_now(" in script.source


def test_every_lua_file_is_used() -> None:
    files = {p.stem for p in (ROOT / "lua").glob("*.lua")}
    assert files == {s.name for s in _scripts.ALL} | {"_ledger"}


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
