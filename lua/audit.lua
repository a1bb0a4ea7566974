--[[ audit.lua: bring the user up to now, then return what the audit compares with its history.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries)
Reply {'OK', balance, last (history id as the state knows it), stream_last (last id in the
       stream), held, trimmed (entries before it were trimmed: archived to PostgreSQL, or
       after a checkpoint; '' = none), checkpoint ("<entry id>\n<JSON>" that trim.lua wrote;
       '' = none), members (JSON [member, record, ...] of a pool's capped members, see
       _ledger.lua "Members"; '[]' past MAX_MEMBERS: not recounted, the reply stays bounded),
       *buckets (bucket id, credits left; each)}
      | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets. The history up to the returned id is then read in
pages by the client: it only grows, so that part cannot change under the audit.
]]
--!include _ledger.lua

local MAX_MEMBERS = 1000

local now = clock(ARGV[1])
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
save_state(st)
local newest = redis.call('XREVRANGE', K_HISTORY, '+', '-', 'COUNT', 1)
local stream_last = '0-0'
if #newest > 0 then stream_last = newest[1][1] end
local reply = { 'OK', fmt(st.bal), fmt(st.ms) .. '-' .. fmt(st.sq), stream_last, fmt(st.held),
  redis.call('HGET', K_STATE, 'tm') or '', redis.call('GET', K_CHECKPOINT) or '',
  '[]' }
if redis.call('HLEN', K_MEMBERS) <= MAX_MEMBERS then
  reply[8] = cjson.encode(redis.call('HGETALL', K_MEMBERS))
end
local buckets = redis.call('HGETALL', K_AMOUNTS)
for i = 1, #buckets do reply[#reply + 1] = buckets[i] end
return reply
