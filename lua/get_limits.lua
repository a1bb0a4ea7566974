--[[ get_limits.lua: the user's limits in effect (its own, else the client's default) and what
was spent of the budget in the running period.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries)
      3 default_limits (the client's; '' = none)
Reply {'OK', own (1|0), limits (spec in effect, '' = none), budget_used, budget_resets_at ('' =
       no budget)} | PERIOD | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets (as any read).
]]
--!include _ledger.lua

local now = clock(ARGV[1])
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
local reply = limits_reply(st, now, ARGV[3])
save_state(st)
return reply
