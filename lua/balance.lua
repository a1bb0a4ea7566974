--[[ balance.lua: bring the user up to now (cycle renewals, expiry), then read the balance.
Writes only when a cycle renewed or a bucket expired.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries)
Reply {'OK', balance} | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets.
]]
--!include _ledger.lua

local now = clock(ARGV[1])
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
save_state(st)
return { 'OK', fmt(st.bal) }
