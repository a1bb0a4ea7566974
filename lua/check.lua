--[[ check.lua: would a charge of `amount` pass now? A dry run of subtract: nothing is charged,
no rate and no budget is used.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 amount
      4 default_limits (the client's, for a user without its own; '' = none)
Reply {'OK', allowed (1|0), reason ('' | 'credits' | 'budget' | 'rate'), balance, credit_limit,
       retry_after_ms ('' = none, or never)}   (available = balance + credit_limit, summed by the
       client: past 2**53 a Lua double would round it)
      | PERIOD | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: renewals, holds released by their ttl, expired buckets (as any read); nothing else.
The reason is subtract's first refusal, in its order: credits, budget, rate.
]]
--!include _ledger.lua

local now, amount = clock(ARGV[1]), tonumber(ARGV[3])
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
save_state(st)
local bal, limit = fmt(st.bal), fmt(st.limit)
if st.bal - amount < -st.limit then  -- subtract's own test
  return { 'OK', '0', 'credits', bal, limit, '' }
end
local _, refused = gate(st, now, amount, ARGV[4])
if not refused then return { 'OK', '1', '', bal, limit, '' } end
if refused[1] == 'BUDGET' then
  return { 'OK', '0', 'budget', bal, limit, refused[4] }
elseif refused[1] == 'RATE' then
  return { 'OK', '0', 'rate', bal, limit, refused[2] }
end
return refused  -- PERIOD
