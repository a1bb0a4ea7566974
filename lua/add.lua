--[[ add.lua: grant credits in a new bucket.
KEYS  1-13 the user's keys (see _ledger.lua); 14 the idempotency record, when a key was given
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 amount
      4 expire_at_ms ('' = none) | 5 ttl_ms ('' = none) | 6 fingerprint | 7 idempotency_ttl_ms
      8 idempotency_key ('' = none) | 9 metadata_json ('' = none) | 10 priority
Reply {'OK', id, kind 'a', amount, balance_after, expire_at, idempotency_key, metadata}
      | {'IDEM_CONFLICT'} | {'EXPIRY_PAST', now} | {'BALANCE_LIMIT', balance}
      (the balance plus held credits stays within 2^53-1) | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets, then one "a" entry. Counts as `added` in the cycle.
With debt, the grant repays it first; only the rest goes into the new bucket.
]]
--!include _ledger.lua

local now, amount = clock(ARGV[1]), tonumber(ARGV[3])
local expire_at = tonumber(ARGV[4])
local fingerprint, ikey, meta = ARGV[6], ARGV[8], ARGV[9]

local prior = replay(fingerprint)
if prior then return prior end

if ARGV[5] ~= '' then expire_at = now + tonumber(ARGV[5]) end
if expire_at and expire_at <= now then return { 'EXPIRY_PAST', fmt(now) } end

local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
if amount > room(st) then
  save_state(st)
  return { 'BALANCE_LIMIT', fmt(st.bal) }
end

local priority = tonumber(ARGV[10])
local fill = amount - repaid(st, amount)
local fields = extras(expire_at, ikey, meta)
if fill > 0 then
  fields[#fields + 1] = 'g'
  fields[#fields + 1] = new_bucket(st, fill, expire_at, priority)
  if priority ~= 0 then
    fields[#fields + 1] = 'p'
    fields[#fields + 1] = ARGV[10]
  end
end
st.bal = st.bal + amount
count_usage(st, now, 'cad', amount)
local id = append(st, 'a', amount, now, fields)
save_state(st)
local reply = tx_reply(id, 'a', amount, st.bal, expire_at, ikey, meta)
remember(fingerprint, ARGV[7], reply)
return reply
