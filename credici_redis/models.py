"""The values the clients return: small frozen pydantic models, integer credits, aware UTC times."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

TransactionKind = Literal["add", "subtract", "expire", "cycle_start"]


class Transaction(BaseModel):
    """One entry of a user's history: a change of the balance, recorded by the script making it."""

    model_config = ConfigDict(frozen=True)

    transaction_id: str
    user_id: str
    kind: TransactionKind
    amount: int = Field(description="signed: + credits in, - credits out")
    created_at: AwareDatetime
    expire_at: AwareDatetime | None = None
    balance_after: int
    idempotency_key: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class Cycle(BaseModel):
    """A user's billing cycle: `amount` credits granted at `started_at`, expiring at `ends_at`."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    started_at: AwareDatetime
    ends_at: AwareDatetime
    amount: int


__all__ = ["Cycle", "Transaction", "TransactionKind"]
