--[[ set_member_cap.lua: set a member's cap on a pool (a budget of its own), or remove it.
KEYS  1-13 the user's (the pool's) keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 member
      4 cap (a budget spec, "B<amount>:<period>:<tz>"; '' = remove the cap)
Reply {'OK', member, cap ('' = none), used, resets_at ('' = no cap)}
      | PERIOD | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets; a cap is not a change of
the balance. What the member spent under a cap with the same period and zone still counts; else
counting starts afresh from the entry after the user's last one, and charges made before this
call never come back to the cap.
]]
--!include _ledger.lua

local now, member, cap = clock(ARGV[1]), ARGV[3], ARGV[4]
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
if cap == '' then
  save_state(st)
  redis.call('HDEL', K_MEMBERS, member)
  return { 'OK', member, '', '0', '' }
end
local lim = parse_limits(cap)
local m = load_member(member)
local same = m and m.lim and m.lim.bk == lim.bk
local start, ends, fresh = period_at(st, lim, same and m.lim.bk, same and m.s, same and m.e, now)
if not start then return ends end  -- PERIOD: nothing set yet
local used = (not fresh and m.used) or 0
-- Counted from the entry after the user's last one: every later charge comes after it, even
-- one dated earlier by a clock that steps back (its id is then the last one's ms, next seq).
local since = (not fresh and m.since ~= '' and m.since) or (fmt(st.ms) .. '-' .. fmt(st.sq + 1))
save_state(st)
redis.call('HSET', K_MEMBERS, member, member_record(cap, used, start, ends, since))
return { 'OK', member, cap, fmt(used), fmt(ends) }
