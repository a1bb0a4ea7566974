--[[ details.lua: bring the user up to now, then read the balance in detail.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries)
Reply {'OK', balance, credit_limit, held, history_from (entries before this id were trimmed from
       Redis: archived, or past the retention; '' = none), *buckets (bucket id, credits left,
       priority; each)}
      | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets.
]]
--!include _ledger.lua

local now = clock(ARGV[1])
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
save_state(st)
local reply = { 'OK', fmt(st.bal), fmt(st.limit), fmt(st.held),
  redis.call('HGET', K_STATE, 'tm') or '' }
local ids = redis.call('ZRANGE', K_ORDER, 0, -1, 'WITHSCORES')
for i = 1, #ids, 2 do
  reply[#reply + 1] = ids[i]
  reply[#reply + 1] = redis.call('HGET', K_AMOUNTS, ids[i])
  reply[#reply + 1] = ids[i + 1]
end
return reply
