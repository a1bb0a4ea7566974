--[[ set_credit_limit.lua: let the balance go down to -limit (0: no overdraft).
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 limit | 4 metadata_json ('' = none)
Reply {'OK', balance} | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets; a "credit_limit" entry (kind d, amount 0,
cl the new limit, m the metadata: who changed it and why) when the limit changes. Setting the limit it already
has writes nothing: setting it twice is setting it once.
A debt beyond a lowered limit stays; it only stops further charges.
]]
--!include _ledger.lua

local now = clock(ARGV[1])
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
local limit = tonumber(ARGV[3])
if limit ~= st.limit then
  local extra = { 'cl', limit }
  if ARGV[4] ~= '' then extra[#extra + 1], extra[#extra + 2] = 'm', ARGV[4] end
  append(st, 'd', 0, now, extra)
end
st.dirty = true
save_state(st)
redis.call('HSET', K_STATE, 'cl', ARGV[3])
return { 'OK', fmt(st.bal) }
