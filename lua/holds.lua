--[[ holds.lua: bring the user up to now (a hold whose ttl passed is released), then list its
active holds, soonest release first.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 limit (1-1000)
Reply {'OK', more ('1': there may be more active holds than listed), *holds (hold id, amount,
       created (the id of its reserve entry; holds older than that field: their ms), expires_at;
       each)}
      | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: renewals, holds released by their ttl, expired buckets (as any read).
Bounded: looks at the first 4 * limit timers only. The timers zset holds an active hold's release
time and an ended hold's forgetting (a day after it ended), so ended holds may fill that window:
then `more` says so.
]]
--!include _ledger.lua

local now, limit = clock(ARGV[1]), tonumber(ARGV[3])
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
save_state(st)
local window = 4 * limit
local ids = redis.call('ZRANGE', K_TIMERS, 0, window - 1)
local reply, listed, more = { 'OK', '0' }, 0, #ids == window
if #ids > 0 then
  local records = redis.call('HMGET', K_HOLDS, unpack(ids))
  for i = 1, #ids do
    local rec = records[i] and split(records[i], '|')
    if rec and rec[1] == 'a' then
      if listed == limit then more = true break end
      listed = listed + 1
      reply[#reply + 1] = ids[i]
      reply[#reply + 1] = rec[2]
      reply[#reply + 1] = rec[4]
      reply[#reply + 1] = rec[3]
    end
  end
end
if more then reply[2] = '1' end
return reply
