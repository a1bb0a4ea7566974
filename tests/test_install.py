"""Installed as users install it: the built wheel, no extras, in a fresh virtual environment,
used against the real Redis. A feature whose extra is missing names the extra.

Needs uv (``./run`` installs it into .uv/; on PATH works too). The core dependencies are pinned
to uv.lock's versions (``uv export``), so a new release cannot turn this red overnight;
``./run test --latest`` covers the newest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL, delete_namespace, uv_command

ROOT = Path(__file__).resolve().parent.parent
CORE = {"redis", "hiredis", "pydantic", "pydantic-core", "tqdm"}
"""What a plain install brings (with their own dependencies, listed below as allowed)."""
EXTRAS_ONLY = {"fakeredis", "lupa", "psycopg", "psycopg-binary", "starlette"}

# Run inside the fresh environment: prints one JSON object of what it saw.
PROBE = r"""
import json, subprocess, sys, time
t = time.perf_counter()
import credici_redis
heavy = sorted(m for m in ("redis", "pydantic", "fakeredis", "psycopg") if m in sys.modules)
from credici_redis import CrediciClient, MissingExtraError
out = {"heavy_at_import": heavy, "errors": {}}
url, ns = sys.argv[1], sys.argv[2]
with CrediciClient.from_url(url, namespace=ns) as c:
    c.add("u", 10, idempotency_key="k")
    c.subtract("u", 3)
    out["balance"] = c.get_balance("u")
    out["history"] = [t.amount for t in c.get_all_user_transactions("u")]
def error(what, call):
    try:
        call()
    except MissingExtraError as e:
        out["errors"][what] = [e.extra, isinstance(e, ImportError), str(e)]
    else:
        out["errors"][what] = None
error("memory", lambda: CrediciClient.from_url("memory://"))
error("postgres", lambda: __import__("credici_redis").PostgresStorage)
error("archive", lambda: __import__("credici_redis.archive"))
error("archive_url", lambda: CrediciClient.from_url(url, archive_url="postgresql://x@127.0.0.1/db"))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_wheel_without_extras(tmp_path: Path) -> None:
    uv = uv_command()
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    env.pop("VIRTUAL_ENV", None)

    def run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args], check=True, capture_output=True, text=True, env=env,
            timeout=240, **kwargs,  # type: ignore[call-overload]
        )  # fmt: skip

    run(uv, "build", "--wheel", "--out-dir", tmp_path / "dist", cwd=ROOT)
    wheel = next((tmp_path / "dist").glob("credici_redis-*.whl"))
    pins = tmp_path / "pins.txt"
    run(uv, "export", "--frozen", "--no-hashes", "--no-emit-project", "--all-extras",
        "--output-file", pins, cwd=ROOT)  # fmt: skip
    venv = tmp_path / "venv"
    run(uv, "venv", "--python", sys.executable, venv)
    python = venv / "bin" / "python"
    run(uv, "pip", "install", "--python", python, "--constraint", pins, wheel)

    listed = json.loads(run(uv, "pip", "list", "--python", python, "--format", "json").stdout)
    installed = {p["name"].lower() for p in listed}
    assert installed & EXTRAS_ONLY == set()
    assert installed >= CORE

    namespace = f"t{uuid.uuid4().hex[:12]}"
    try:
        probe = run(python, "-c", PROBE, REDIS_URL, namespace, cwd=tmp_path)
    finally:
        delete_namespace(namespace)
    seen = json.loads(probe.stdout)
    assert seen["heavy_at_import"] == []
    assert seen["balance"] == 7
    assert seen["history"] == [-3, 10]
    for what, extra in [
        ("memory", "embedded"),
        ("postgres", "postgres"),
        ("archive", "postgres"),
        ("archive_url", "postgres"),
    ]:
        got_extra, is_import_error, message = seen["errors"][what]
        assert (got_extra, is_import_error) == (extra, True), what
        assert f"pip install 'credici-redis[{extra}]'" in message

    cli = venv / "bin" / "credici-redis"
    assert "balance" in run(cli, "--help").stdout
    demo = subprocess.run(
        [cli, "demo", "--seconds", "1"], capture_output=True, text=True, env=env, timeout=60
    )
    assert demo.returncode == 1
    assert "pip install 'credici-redis[embedded]'" in demo.stderr
    balance = run(cli, "--redis-url", REDIS_URL, "--namespace", namespace, "balance", "nobody")
    assert balance.stdout.strip() == "0"
