"""The Python <-> Lua contract: each operation's ARGV names, reply names and codes against its
script's header (no server needed). The header is the script's documentation; the operation is
what Python sends and reads. Either may change: this test makes them change together.

Header grammar (see lua/subtract.lua):
    ARGV  1 now_ms (...) | 2 extension (...) | 3 <request field> (...) | ...
    Reply {'OK', <name> (...), ...} | <x>_reply [+ {<name>, ...}] | {'CODE', ...} | WORD ...
A reply named `<x>_reply` is defined by a ``-- Reply {...}`` comment above its function in
lua/_ledger.lua, whose return must have as many fields.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from credici_redis._core.codes import LIMITS_PROGRESS, PROGRESS, REFUSALS
from credici_redis._core.operation import CLOCK_ARGS, Operation
from credici_redis._ops import OPERATIONS

LEDGER = (Path(__file__).resolve().parent.parent / "lua" / "_ledger.lua").read_text()


def header(source: str) -> str:
    return source.split("]]", 1)[0]


def _section(head: str, name: str) -> str:
    """The lines of a header section: its first line and the indented ones after it."""
    lines = head.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(name))
    end = start + 1
    while end < len(lines) and lines[end].startswith(" "):
        end += 1
    joined = "\n".join(line.strip() for line in lines[start:end])
    return joined[len(name) :]


def argv_names(head: str) -> list[str]:
    found = re.findall(r"(?:^|\||\n)\s*(\d+) ([a-z_]+)", _section(head, "ARGV").strip())
    numbers = [int(n) for n, _ in found]
    assert numbers == list(range(1, len(found) + 1)), f"ARGV numbered {numbers}"
    return [name for _, name in found]


def _elements(braced: str) -> list[str]:
    """The names of a {...} reply's fields: each element's first word, parentheses skipped."""
    depth, parts, current = 0, [], ""
    for char in braced:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    names = []
    for part in parts:
        word = re.match(r"\s*('OK'|\*?[a-z_]+)", part)
        assert word, f"a reply field without a name: {part!r}"
        names.append(word.group(1).strip("'"))
    return names


def _braces(text: str) -> str:
    """The first {...} of `text`, inner text, nested parentheses allowed."""
    start = text.index("{")
    return text[start + 1 : text.index("}", start)]


def reply_names(head: str, ledger: str = LEDGER) -> list[str]:
    reply = _section(head, "Reply").strip()
    named = re.match(r"([a-z]+_reply)(?:\s*\(.*?\))?(?:\s*\+\s*\{([^}]*)\})?", reply)
    if named:
        comment = re.search(
            rf"-- Reply (\{{[^}}]*\}})\s*\n(?:--[^\n]*\n)*local function {named.group(1)}\(",
            ledger,
        )
        assert comment, f"{named.group(1)} has no '-- Reply {{...}}' comment in _ledger.lua"
        names = _elements(_braces(comment.group(1).replace("--", " ")))
        return names + (_elements(named.group(2)) if named.group(2) else [])
    return _elements(_braces(reply))


def reply_codes(head: str) -> set[str]:
    reply = _section(head, "Reply")
    codes = set(re.findall(r"\{'([A-Z_]+)'", reply)) - {"OK"}
    return codes | set(re.findall(r"\b(SCHEDULE|PERIOD|ZONE|CATCHUP|INCONSISTENT)\b", reply))


def ledger_reply_sizes(ledger: str = LEDGER) -> dict[str, tuple[int, int]]:
    """For each `<x>_reply` function: (fields in its comment, fields in its return)."""
    sizes = {}
    for comment, name, body in re.findall(
        r"-- Reply (\{[^}]*\})\s*\n(?:--[^\n]*\n)*local function ([a-z]+_reply)\(.*?\n(.*?)\nend",
        ledger,
        re.S,
    ):
        returned = re.search(r"return (\{.*\})", body)
        assert returned, name
        fields = _elements(_braces(comment.replace("--", " ")))
        sizes[name] = (len(fields), len(returned.group(1).split(",")))
    return sizes


def problems(
    argv: tuple[str, ...],
    reply: tuple[str, ...],
    codes: set[str],
    source: str,
    ledger: str = LEDGER,
) -> list[str]:
    """Where an operation (its ARGV names, reply names, codes) and its script's header differ."""
    head = header(source)
    found = []
    if argv_names(head) != [*CLOCK_ARGS, *argv]:
        found.append(f"ARGV: header {argv_names(head)}, operation {[*CLOCK_ARGS, *argv]}")
    if reply_names(head, ledger) != list(reply):
        found.append(f"Reply: header {reply_names(head, ledger)}, operation {list(reply)}")
    if reply_codes(head) != codes:
        found.append(f"codes: header {sorted(reply_codes(head))}, operation {sorted(codes)}")
    return found


def expected_codes(op: Operation[object, object]) -> set[str]:
    budgets = {"default_limits", "member"}  # a budget or a member's cap: may ask for a period
    asks = LIMITS_PROGRESS if budgets & set(op.argv) else frozenset()
    return set(op.refusals) | set(op.outcomes) | PROGRESS | asks


@pytest.mark.parametrize("op", list(OPERATIONS.values()), ids=lambda op: op.name)
def test_each_operation_agrees_with_its_scripts_header(op: Operation[object, object]) -> None:
    assert problems(op.argv, op.reply, expected_codes(op), op.script.source) == []


@pytest.mark.parametrize("op", list(OPERATIONS.values()), ids=lambda op: op.name)
def test_each_refusal_has_its_exception(op: Operation[object, object]) -> None:
    assert set(op.refusals) <= set(REFUSALS)


def test_the_shared_replies_return_the_fields_their_comment_names() -> None:
    sizes = ledger_reply_sizes()
    assert set(sizes) == {"tx_reply", "cycle_reply", "hold_reply", "limits_reply", "transfer_reply"}
    for name, (named, returned) in sizes.items():
        assert named == returned, name


SUBTRACT = """--[[ subtract.lua: take credits out.
KEYS  1-9 the user's keys
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 amount | 4 fingerprint
      5 idempotency_ttl_ms | 6 idempotency_key ('' = none) | 7 metadata_json ('' = none)
      8 default_limits | 9 member
Reply {'OK', id, kind 's', amount (-amount), balance_after, expire_at '', idempotency_key, metadata}
      | {'IDEM_CONFLICT'} | {'INSUFFICIENT', available (balance + credit limit)}
      | {'BUDGET', remaining, resets_at} | {'RATE', retry_after_ms}
      | PERIOD | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: one "s" entry.
]]"""


def test_the_check_fails_when_a_header_and_its_operation_disagree() -> None:
    op = OPERATIONS["subtract"]
    codes = expected_codes(op)
    assert problems(op.argv, op.reply, codes, SUBTRACT) == []
    swapped = SUBTRACT.replace("3 amount | 4 fingerprint", "3 fingerprint | 4 amount")
    assert [p[:5] for p in problems(op.argv, op.reply, codes, swapped)] == ["ARGV:"]
    missing = SUBTRACT.replace(" balance_after,", "")
    assert [p[:6] for p in problems(op.argv, op.reply, codes, missing)] == ["Reply:"]
    new_code = SUBTRACT.replace("{'IDEM_CONFLICT'}", "{'IDEM_CONFLICT'} | {'FROZEN'}")
    assert [p[:6] for p in problems(op.argv, op.reply, codes, new_code)] == ["codes:"]
    # ... and when the operation changes instead of the script.
    assert problems(op.argv[:-1], op.reply, codes, SUBTRACT)
    assert problems(op.argv, (*op.reply, "extra"), codes, SUBTRACT)
    assert problems(op.argv, op.reply, codes - {"INSUFFICIENT"}, SUBTRACT)


def test_a_shared_reply_is_read_from_the_ledger() -> None:
    head = "ARGV  1 now_ms | 2 extension\nReply cycle_reply (see _ledger.lua) | {'NONE'}\n"
    assert reply_names(head)[:3] == ["OK", "cycle_id", "started_at"]
    short = LEDGER.replace("-- Reply {'OK', cycle_id, ", "-- Reply {'OK', ")
    assert ledger_reply_sizes(short)["cycle_reply"] != ledger_reply_sizes()["cycle_reply"]
