--[[ archive_lag.lua: every user waiting in many slots' archive outboxes, in one call.
Only on a single Redis (its keys span slots); on a cluster the archiver reads each outbox with
ZRANGE instead.
KEYS  the outboxes of n slots
ARGV  none
Reply {history key, ms of its oldest entry not yet archived, history key, ms, ...}
History: none (reads only).
]]

local reply = {}
for i = 1, #KEYS do
  local waiting = redis.call('ZRANGE', KEYS[i], 0, -1, 'WITHSCORES')
  for j = 1, #waiting do reply[#reply + 1] = waiting[j] end
end
return reply
