--[[ cycle.lua: bring the user up to now, then read the current (or last) cycle.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries)
Reply cycle_reply (see _ledger.lua) | {'NONE'} | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets.
]]
--!include _ledger.lua

local now = clock(ARGV[1])
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
save_state(st)
local c = load_cycle()
if not c then return { 'NONE' } end
return cycle_reply(c, now)
