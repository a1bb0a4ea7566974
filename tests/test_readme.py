"""Every Python example in the README runs as written (on a namespace of the test's own)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def runnable(block: str) -> bool:
    # Signature listings are documentation, not programs.
    return "from credici_redis import" in block


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if runnable(b)], ids=lambda b: b.split("\n")[0][:40]
)
async def test_readme_example_runs(block: str, namespace: str) -> None:
    code = block.replace('namespace="myapp"', f'namespace="{namespace}"')
    if "await " in code:
        code = "async def __example():\n" + "".join(f"    {line}\n" for line in code.splitlines())
        scope: dict[str, object] = {}
        exec(compile(code, str(README), "exec"), scope)
        await scope["__example"]()  # type: ignore[operator]
    else:
        exec(compile(code, str(README), "exec"), {})


def test_readme_has_runnable_examples() -> None:
    assert len([b for b in BLOCKS if runnable(b)]) >= 4
