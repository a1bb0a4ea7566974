--[[ cancel_cycle.lua: stop the cycle from renewing; with forfeit, its grant expires now.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 forfeit (0|1)
Reply cycle_reply (see _ledger.lua) | {'NO_CYCLE'} | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets; with forfeit, an "e" entry for what the grant had left.
Cancelling a canceled cycle changes nothing (but forfeit still takes effect).
]]
--!include _ledger.lua

local now = clock(ARGV[1])
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
local c = load_cycle()
if not c or c.cst == 'e' then
  save_state(st)
  return { 'NO_CYCLE' }
end
c.cst, c.crn = 'c', '0'
if ARGV[3] == '1' then close_grant(st, c, '0', now) end
save_cycle(c, st)
save_state(st)
return cycle_reply(c, now)
