--[[ usage.lua: bring the user up to now (as any read), then read its usage rollups.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries, usage zone)
      3 fields (the records to read, ' '-separated: H<hour> or D<day>; at most 1,000)
Reply {'OK', zone (of the days), hour (of the running slot, '' = none), day, spent, granted,
       expired, charges (the running slot's counts), hours_dropped (records up to this hour
       are gone, '' = none), days_dropped, counted_from (ms; 0 = since the user's first entry,
       '' = nothing counted yet), *records (each field's "spent:granted:expired:charges" or '')}
      | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets (as any read).
]]
--!include _ledger.lua

local now = clock(ARGV[1])
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
save_state(st)
local v = redis.call('HMGET', K_STATE, 'uz', 'uh', 'ud', 'u1', 'u2', 'u3', 'u4', 'up', 'uq', 'u0')
local reply = { 'OK' }
for i = 1, 10 do reply[i + 1] = v[i] or '' end
local names = {}
for name in string.gmatch(ARGV[3], '%S+') do names[#names + 1] = name end
if #names > 0 then
  local records = redis.call('HMGET', K_USAGE, unpack(names))
  for i = 1, #names do reply[#reply + 1] = records[i] or '' end
end
return reply
