--[[ archive_lag.lua: the oldest member of many slots' archive outboxes, in one call.
Only on a single Redis (its keys span slots); on a cluster the archiver sends ZRANGE 0 0 to each
outbox instead. Bounded: two values per outbox, whatever the users waiting (the archiver then
pages through the outboxes that hold any).
KEYS  the outboxes of n slots
ARGV  none
Reply {history key of the outbox's oldest waiting user or false, its ms or false, ...}
History: none (reads only).
]]

local reply = {}
for i = 1, #KEYS do
  local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  reply[#reply + 1] = first[1] or false
  reply[#reply + 1] = first[2] or false
end
return reply
