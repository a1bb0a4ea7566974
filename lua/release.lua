--[[ release.lua: end a hold without charging: every held credit goes back.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 local_id (hold id
      within the user) | 4 metadata_json ('' = none: why, kept in the "l" entry)
Reply hold_reply (status 'released') | {'NO_HOLD'} | {'HOLD_DONE', status}
      | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: renewals, holds released by their ttl, expired buckets, then one "l" entry (+amount),
then an "e" entry for credits whose bucket expired while held. The held amount comes back to the
limits' budget (and to its member's cap), if the hold counted in the running period.
]]
--!include _ledger.lua

local now, hold_id = clock(ARGV[1]), ARGV[3]
local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
local rec, missing = active_hold(st, hold_id)
if missing then return missing end
local fields = member_fields(rec[6])
if (ARGV[4] or '') ~= '' then fields[#fields + 1] = 'm'; fields[#fields + 1] = ARGV[4] end
give_back(st, hold_id, rec[5] or '', now, 'l', fields)
budget_back(tonumber(rec[2]), rec[4], now)
member_back(rec[6], tonumber(rec[2]), rec[4], now)
finish_hold(st, hold_id, rec, 'r', 0, now)
save_state(st)
return hold_reply(hold_id, { 'r', rec[2], rec[3], rec[4], '0' })
