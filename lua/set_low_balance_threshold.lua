--[[ set_low_balance_threshold.lua: ask for events when the balance falls below a threshold.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries)
      3 threshold ('' = no events)
Reply {'OK', balance} | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: renewals, holds released by their ttl, expired buckets (events for them use the old
threshold). The threshold itself is not a change of the balance.
]]
--!include _ledger.lua

local now = clock(ARGV[1])
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
save_state(st)
if ARGV[3] == '' then
  redis.call('HDEL', K_STATE, 'lt')
else
  redis.call('HSET', K_STATE, 'lt', ARGV[3])
end
return { 'OK', fmt(st.bal) }
