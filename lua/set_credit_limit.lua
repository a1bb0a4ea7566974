--[[ set_credit_limit.lua: let the balance go down to -limit (0: no overdraft).
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 limit
Reply {'OK', balance} | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets; the limit itself is not a change of the balance.
A debt beyond a lowered limit stays; it only stops further charges.
]]
--!include _ledger.lua

local now = clock(ARGV[1])
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
st.dirty = true
save_state(st)
redis.call('HSET', K_STATE, 'cl', ARGV[3])
return { 'OK', fmt(st.bal) }
