--[[ transfer_out.lua: a transfer's first step: take the credits out of the source and record the
transfer as pending (see "Transfers" in _ledger.lua); a second call finds it (pending, or done).
KEYS  1-13 the source's keys (see _ledger.lua); 14 the source's transfer records (hash); 15 the
      transfer queue of the source's slot; 16 the idempotency record, when a key was given
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 transfer_id
      4 record_id (its field in KEYS[14]: made from the idempotency key, so that a retry finds
      it; the transfer id is new with every transfer) | 5 user_id (the source) | 6 to_user
      7 amount | 8 expire_at_ms ('' = the source buckets' own) | 9 fingerprint
      10 idempotency_ttl_ms | 11 idempotency_key ('' = none) | 12 metadata_json ('' = none)
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
local now, amount = clock(ARGV[1]), tonumber(ARGV[7])
local expire_at = tonumber(ARGV[8])
local fingerprint, ikey, meta = ARGV[9], ARGV[11], ARGV[12]

local prior = replay(fingerprint)
if prior then return prior end
local pending = redis.call('HGET', KEYS[14], ARGV[4])
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
for _, v in ipairs({ 'u', parts, 'tf', ARGV[3], 'to', ARGV[6] }) do fields[#fields + 1] = v end
local id = append(st, 'o', -amount, now, fields)
save_state(st)
local r = {
  id = ARGV[3], rid = ARGV[4], fp = fingerprint, from = ARGV[5], to = ARGV[6], n = ARGV[7],
  u = parts, x = ARGV[8], t = fmt(now), o = id, i = ikey, m = meta,
}
redis.call('HSET', KEYS[14], ARGV[4], cjson.encode(r))
redis.call('ZADD', KEYS[15], now, KEYS[14] .. '#' .. ARGV[4])
return transfer_reply(r, 'pending', '')
