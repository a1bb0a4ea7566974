"""Every operation, one module per family: where each is built, which script it runs, how its
reply becomes a model, and which errors it raises (codes in `credici_redis._core.codes`).

    module      operation                  script                        result
    charge      add, subtract (+ _many)    add.lua, subtract.lua         Transaction
    holds       reserve                    reserve.lua                   Hold
                capture                    capture.lua                   Transaction
                release, get_hold          release.lua, hold.lua         Hold
                get_holds                  holds.lua                     ActiveHolds
    reverse     reverse                    reverse.lua                   Transaction
    cycles      start_cycle, get_cycle,    start_cycle.lua, cycle.lua,   Cycle (None: no cycle)
                cancel_cycle               cancel_cycle.lua
    account     balance, details,          balance.lua, details.lua,     int, BalanceDetails,
                set_credit_limit,          set_credit_limit.lua,         None
                set_low_balance_threshold  set_low_balance_threshold.lua
    limits      check                      check.lua                     Decision
                set_limits, get_limits     set_limits.lua, get_limits.lua  Limits
                (enforced by subtract.lua and reserve.lua; the wire form of limits)
    members     set_member_cap,            set_member_cap.lua,           MemberUsage
                get_member_usage           member_usage.lua
                (caps enforced by subtract.lua and reserve.lua with a member)
    transfers   transfer (3 scripts: out,   transfer_out.lua,             Transfer
                in, settle; recover_transfers) transfer_in.lua, transfer_settle.lua
    usage       get_usage                  usage.lua                     list[UsagePoint]
    retention   trim_history               trim.lua + XRANGE pages       TrimReport
    history     history                    balance.lua + XREVRANGE pages list[Transaction]
    audit       audit                      audit.lua + XRANGE pages      AuditSnapshot

A new operation: its script in lua/ (header: KEYS, ARGV by field name, Reply by field name), its
Operation (request type, builder, ARGV names, reply names and parser, refusal codes) in the
family's module here, and the clients' typed method (`_clients/client_async.py`; the sync one is
generated). tests/test_contract_lua.py checks the Operation against the script's header.
"""

from credici_redis._core.operation import OPERATIONS, Operation
from credici_redis._ops import (
    account,
    audit,
    charge,
    cycles,
    history,
    holds,
    limits,
    members,
    retention,
    reverse,
    transfers,
    usage,
)

__all__ = [
    "OPERATIONS",
    "Operation",
    "account",
    "audit",
    "charge",
    "cycles",
    "history",
    "holds",
    "limits",
    "members",
    "retention",
    "reverse",
    "transfers",
    "usage",
]
