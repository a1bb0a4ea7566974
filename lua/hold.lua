--[[ hold.lua: bring the user up to now (a hold whose ttl passed is released), then read a hold.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 local_id (hold id
      within the user)
Reply hold_reply | {'NO_HOLD'} (never made, or forgotten a day after it ended)
      | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: renewals, holds released by their ttl, expired buckets (as any read).
]]
--!include _ledger.lua

local now, hold_id = clock(ARGV[1]), ARGV[3]
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
save_state(st)
local raw = redis.call('HGET', K_HOLDS, hold_id)
if not raw then return { 'NO_HOLD' } end
local rec = split(raw, '|')
if rec[1] == 'a' then rec[5] = '0' end  -- an active hold keeps its parts there: nothing captured
return hold_reply(hold_id, rec)
