"""check(user, amount): would a charge pass now? The answer subtract would give, nothing charged
(issue 17's dry run; credits only so far)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from credici_redis import Decision, InsufficientCreditsError, InvalidAmountError
from credici_redis.errors import InvalidUserIdError
from tests.conftest import FakeClock


async def test_check_gives_subtracts_answer_and_charges_nothing(client: Any, user: str) -> None:
    await client.add(user, 10)
    before = await client.get_all_user_transactions(user)
    assert await client.check(user, 10) == Decision(allowed=True, reason=None, available=10)
    refused = await client.check(user, 11)
    assert (refused.allowed, refused.reason, refused.available) == (False, "credits", 10)
    assert refused.retry_after is None
    assert await client.get_all_user_transactions(user) == before  # nothing written
    assert await client.get_balance(user) == 10
    with pytest.raises(InsufficientCreditsError):  # the charge agrees with the check
        await client.subtract(user, 11)
    assert (await client.subtract(user, 10)).balance_after == 0
    assert (await client.check(user, 1)).allowed is False


async def test_check_counts_the_credit_limit_and_expiry(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.add(user, 5, ttl=timedelta(hours=1))
    await client.add(user, 3)
    await client.set_credit_limit(user, 4)
    assert await client.check(user, 12) == Decision(allowed=True, reason=None, available=12)
    assert (await client.check(user, 13)).allowed is False
    clock.advance(timedelta(hours=2))  # the 5 expired: the check sees it, as a charge would
    decision = await client.check(user, 8)
    assert (decision.allowed, decision.available) == (False, 7)
    assert (await client.check(user, 7)).allowed
    assert (await client.subtract(user, 7)).balance_after == -4  # into the credit limit


async def test_a_user_never_seen_has_nothing_to_charge(client: Any, user: str) -> None:
    assert await client.check(user, 1) == Decision(allowed=False, reason="credits", available=0)


@pytest.mark.parametrize("amount", [0, -1, 1.5, True, "3", 2**53])
async def test_check_refuses_bad_amounts_before_sending(client: Any, amount: object) -> None:
    with pytest.raises(InvalidAmountError):
        await client.check("someone", amount)


async def test_check_refuses_a_bad_user(client: Any) -> None:
    with pytest.raises(InvalidUserIdError):
        await client.check("", 1)
