--[[ transfer_out.lua: a transfer's first step: take the credits out of the source and record the
transfer as pending (see "Transfers" in _ledger.lua); a second call finds it (pending, or done).
KEYS  1-13 the source's keys (see _ledger.lua); 14 the transfer's record; 15 the transfer queue
      of the source's slot; 16 the idempotency record, when a key was given
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 transfer_id
      4 user_id (the source) | 5 to_user | 6 amount | 7 expire_at_ms ('' = the source buckets' own)
      8 fingerprint | 9 idempotency_ttl_ms | 10 idempotency_key ('' = none)
      11 metadata_json ('' = none)
Reply transfer_reply (status 'pending', or 'completed' from the idempotency record)
      | {'IDEM_CONFLICT'} | {'EXPIRY_PAST', now} | {'INSUFFICIENT', balance, credit_limit '0'}
      | {'REFUNDED', reason, transfer_id, refund_id} (from the idempotency record)
      | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets, then one "o" entry (u: the
buckets it took from, tf: the transfer, to: the destination). Only credits the source holds move:
never its credit limit. Counts as spent in the usage rollups, not as a charge, nor in the cycle,
the limits or a member's cap.
]]
--!include _ledger.lua

K_IDEM = KEYS[16]
local now, amount = clock(ARGV[1]), tonumber(ARGV[6])
local expire_at = tonumber(ARGV[7])
local fingerprint, ikey, meta = ARGV[8], ARGV[10], ARGV[11]

local prior = replay(fingerprint)
if prior then return prior end
local pending = redis.call('GET', KEYS[14])
if pending then
  local r = cjson.decode(pending)
  if r.fp ~= fingerprint then return { 'IDEM_CONFLICT' } end
  return transfer_reply(r, 'pending', '')
end
if expire_at and expire_at <= now then return { 'EXPIRY_PAST', fmt(now) } end

local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
if amount > st.bal then
  save_state(st)
  return { 'INSUFFICIENT', fmt(st.bal), '0' }
end
local parts = {}
take(amount, parts)
parts = table.concat(parts, ';')
st.bal = st.bal - amount
local fields = extras(nil, ikey, meta)
for _, v in ipairs({ 'u', parts, 'tf', ARGV[3], 'to', ARGV[5] }) do fields[#fields + 1] = v end
local id = append(st, 'o', -amount, now, fields)
save_state(st)
local r = {
  id = ARGV[3], fp = fingerprint, from = ARGV[4], to = ARGV[5], n = ARGV[6], u = parts,
  x = ARGV[7], t = fmt(now), o = id, i = ikey, m = meta,
}
redis.call('SET', KEYS[14], cjson.encode(r))
redis.call('ZADD', KEYS[15], now, KEYS[14])
return transfer_reply(r, 'pending', '')
