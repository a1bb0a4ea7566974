--[[ capture.lua: charge what a hold was for (all of it, or less) and give back the rest.
KEYS  1-13 the user's keys (see _ledger.lua); 14 the idempotency record, when a key was given
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 local_id (hold id
      within the user) | 4 amount ('' = all) | 5 fingerprint | 6 idempotency_ttl_ms
      7 idempotency_key ('' = none)
Reply {'OK', id, kind 'p', amount (+returned), balance_after (of the "p" entry), expire_at '',
       idempotency_key, metadata '', hold_id, captured, member ('' = none)}
      | {'IDEM_CONFLICT'} | {'NO_HOLD'} | {'HOLD_DONE', status} | {'HOLD_EXCEEDED', held}
      | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: renewals, holds released by their ttl, expired buckets, then one "p" entry for what came
back to the available balance (the captured credits had already left it at reserve), then an "e"
entry for returned credits whose bucket expired while held. Counts as `used` in the cycle.
Held credits stay capturable until the hold ends, even when their bucket expired meanwhile.
What is not captured comes back to the limits' budget, if the hold counted in the running period.
]]
--!include _ledger.lua

local now, hold_id = clock(ARGV[1]), ARGV[3]
local fingerprint, ikey = ARGV[5], ARGV[7]

local prior = replay(fingerprint)
if prior then return prior end

local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
local rec, missing = active_hold(st, hold_id)
if missing then return missing end
local held = tonumber(rec[2])
local charge = tonumber(ARGV[4]) or held
if charge > held then
  save_state(st)
  return { 'HOLD_EXCEEDED', rec[2] }
end

-- The captured credits are the first parts (burn order); the rest go back.
local rest, charged, left = {}, {}, charge
for _, part in ipairs(split(rec[5] or '', ';')) do
  local bucket, credits, priority = string.match(part, '^([^:]+):([^:]+):(.+)$')
  credits = tonumber(credits)
  local used = math.min(credits, left)
  left = left - used
  if used > 0 then charged[#charged + 1] = bucket .. ':' .. fmt(used) .. ':' .. priority end
  if credits > used then rest[#rest + 1] = bucket .. ':' .. fmt(credits - used) .. ':' .. priority end
end
local fields = { 'q', fmt(charge) }
if #charged > 0 then fields[#fields + 1] = 'u'; fields[#fields + 1] = table.concat(charged, ';') end
if ikey ~= '' then fields[#fields + 1] = 'i'; fields[#fields + 1] = ikey end
if rec[6] then fields[#fields + 1] = 'mb'; fields[#fields + 1] = rec[6] end
local id, back, after = give_back(st, hold_id, table.concat(rest, ';'), now, 'p', fields)
count_usage(st, now, 'cu', charge)
budget_back(held - charge, rec[4], now)
member_back(rec[6], held - charge, rec[4], now)
finish_hold(st, hold_id, rec, 'c', charge, now)
save_state(st)
-- The reply is the "p" entry as history has it: its balance_after is before any "e" entry.
local reply = tx_reply(id, 'p', back, after, nil, ikey, '')
reply[#reply + 1] = hold_id
reply[#reply + 1] = fmt(charge)
reply[#reply + 1] = rec[6] or ''
remember(fingerprint, ARGV[6], reply)
return reply
