"""Members of a pool: a pool is an ordinary account whose credits its members spend
(`subtract(..., member=)`, `reserve(..., member=)`; their history entries name the member). A
member's cap is a `Budget` of its own, checked and counted in the same atomic step as the charge,
in the pool's slot. Here: `set_member_cap` (lua/set_member_cap.lua) and `get_member_usage`
(lua/member_usage.lua); the check itself is in lua/_ledger.lua ("Members"), run by subtract.lua
and reserve.lua. Exceeding a cap raises BudgetExceededError with `member` set."""

from __future__ import annotations

from dataclasses import dataclass

from credici_redis._core import requests as check
from credici_redis._core.limit_spec import decode, encode
from credici_redis._core.operation import Operation, Reply
from credici_redis._core.scripts import load
from credici_redis._core.time import from_ms
from credici_redis.errors import InvalidLimitError, InvalidMemberError
from credici_redis.models import Budget, MemberUsage


@dataclass(frozen=True, slots=True)
class MemberRequest:
    user_id: str
    member: str
    now_ms: int | None


@dataclass(frozen=True, slots=True)
class SetMemberCapRequest:
    user_id: str
    member: str
    cap: str
    """A budget spec (`credici_redis._core.limit_spec`); '' removes the cap."""
    now_ms: int | None


def _usage(req: MemberRequest | SetMemberCapRequest, r: Reply) -> MemberUsage:
    resets = r["resets_at"]
    return MemberUsage(
        user_id=req.user_id,
        member=r["member"],
        cap=decode(r["cap"])[1],
        used=int(r["used"]),
        resets_at=from_ms(int(resets)) if resets else None,
    )


USAGE_REPLY = ("OK", "member", "cap", "used", "resets_at")

SET_MEMBER_CAP: Operation[SetMemberCapRequest, MemberUsage] = Operation(
    "set_member_cap",
    SetMemberCapRequest,
    load("set_member_cap", effect=False),  # setting it twice is setting it once
    argv=("member", "cap"),
    reply=USAGE_REPLY,
    parse=_usage,
)

GET_MEMBER_USAGE: Operation[MemberRequest, MemberUsage] = Operation(
    "get_member_usage",
    MemberRequest,
    load("member_usage", effect=False, write=False),
    argv=("member",),
    reply=USAGE_REPLY,
    parse=_usage,
)


def _member(value: object) -> str:
    member = check.member(value)
    if not member:
        raise InvalidMemberError("member must be given (a non-empty str or a UUID)")
    return member


def build_set_member_cap(
    user: object, member: object, cap: object, now_ms: int | None
) -> SetMemberCapRequest:
    if cap is not None and not isinstance(cap, Budget):
        raise InvalidLimitError(f"cap must be a Budget or None, not {cap!r}")
    spec = encode(None, cap)
    return SetMemberCapRequest(check.user_id(user), _member(member), spec, now_ms)


def build_member(user: object, member: object, now_ms: int | None) -> MemberRequest:
    return MemberRequest(check.user_id(user), _member(member), now_ms)
