--[[ check.lua: would a charge of `amount` pass now? A dry run of subtract: nothing is charged.
KEYS  1-9 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 amount
Reply {'OK', allowed (1|0), reason ('' | 'credits'), available (balance + credit limit)}
      | SCHEDULE | CATCHUP | INCONSISTENT
History: renewals, holds released by their ttl, expired buckets (as any read); nothing else.
]]
--!include _ledger.lua

local now, amount = clock(ARGV[1]), tonumber(ARGV[3])
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
save_state(st)
local available = st.bal + st.limit
if st.bal - amount < -st.limit then  -- subtract's own test
  return { 'OK', '0', 'credits', fmt(available) }
end
return { 'OK', '1', '', fmt(available) }
