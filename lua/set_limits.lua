--[[ set_limits.lua: set the user's own limits (rate, budget), or clear them ('': the client's
default applies again). Reply: the limits in effect, as get_limits.lua.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 limits (spec, see
      _ledger.lua; '' = clear) | 4 default_limits (the client's; '' = none)
Reply {'OK', own (1|0), limits (spec in effect, '' = none), budget_used, budget_resets_at ('' =
       no budget)} | PERIOD | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets; limits are not a change of
the balance. What was spent of a budget with the same period and zone still counts; charges made
before this call never give budget back (bf, and bc moved up to it).
]]
--!include _ledger.lua

local now = clock(ARGV[1])
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
if ARGV[3] == '' then st.lim = nil else st.lim = ARGV[3] end
local reply = limits_reply(st, now, ARGV[4])
if reply[1] ~= 'OK' then return reply end  -- PERIOD: nothing set yet
st.dirty = true
save_state(st)
if st.lim then
  redis.call('HSET', K_STATE, 'lim', st.lim)
else
  redis.call('HDEL', K_STATE, 'lim')
end
local floor = next_id(st, now)
redis.call('HSET', K_STATE, 'bf', floor)
if redis.call('HEXISTS', K_STATE, 'bc') == 1 then redis.call('HSET', K_STATE, 'bc', floor) end
return reply
