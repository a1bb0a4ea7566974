--[[ member_usage.lua: a member's cap on a pool and what it spent of it in the running period.
KEYS  1-13 the user's (the pool's) keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 member
Reply {'OK', member, cap ('' = none), used, resets_at ('' = no cap)}
      | PERIOD | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets (as any read).
]]
--!include _ledger.lua

local now, member = clock(ARGV[1]), ARGV[3]
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
local m = load_member(member)
if not m or not m.lim or not m.lim.ba then
  save_state(st)
  return { 'OK', member, '', '0', '' }
end
local start, ends, fresh = period_at(st, m.lim, m.lim.bk, m.s, m.e, now)
if not start then return ends end
save_state(st)
return { 'OK', member, m.cap, fmt((fresh and 0) or m.used), fmt(ends) }
