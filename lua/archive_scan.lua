--[[ archive_scan.lua: the users of many slots that the archiver has work for, in one call.
Only on a single Redis (its keys span slots); on a cluster the archiver reads each slot's keys
with ZRANGE / ZRANGEBYSCORE instead.
KEYS  the outboxes of n slots, then their trim queues (n each)
ARGV  1 most users per slot | 2 trim horizon (ms): kept entries older than this are due
Reply {full (1 if some slot had more users than returned, else 0), history key, history key, ...}
History: none (reads only).
]]

local n, count, horizon = #KEYS / 2, tonumber(ARGV[1]), ARGV[2]
local reply, full = { 0 }, 0
for i = 1, n do
  local waiting = redis.call('ZRANGE', KEYS[i], 0, count - 1)
  local due = redis.call('ZRANGEBYSCORE', KEYS[n + i], '-inf', horizon, 'LIMIT', 0, count)
  if #waiting >= count or #due >= count then full = 1 end
  for _, key in ipairs(waiting) do reply[#reply + 1] = key end
  for _, key in ipairs(due) do reply[#reply + 1] = key end
end
reply[1] = full
return reply
