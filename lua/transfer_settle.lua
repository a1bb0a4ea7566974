--[[ transfer_settle.lua: a transfer's last step, on the source: it is done, or its credits come
back (see "Transfers" in _ledger.lua). Once: a second call finds no record (GONE).
KEYS  1-13 the source's keys (see _ledger.lua); 14 the source's transfer records (hash); 15 the
      transfer queue of the source's slot; 16 the idempotency record, when the transfer had a key
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 record_id
      4 outcome ('done', or why the destination refused: 'BALANCE_LIMIT', 'STALE')
      5 in_id (the destination's entry, when done) | 6 idempotency_ttl_ms
Reply transfer_reply (status 'completed') | {'REFUNDED', reason, transfer_id, refund_id}
      | {'GONE'} (settled before) | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: nothing when done; when refunded: cycle renewals, holds released by their ttl, expired
buckets, then one "v" entry reversing the "o" entry (o, tf, and u: the parts given back, so that
the audit needs no "o" entry a retention trim may have taken; credits of buckets that expired
meanwhile do not come back: w), as reverse.lua gives a charge back.
]]
--!include _ledger.lua

K_IDEM = KEYS[16]
local now, outcome = clock(ARGV[1]), ARGV[4]

local raw = redis.call('HGET', KEYS[14], ARGV[3])
if not raw then return { 'GONE' } end
local r = cjson.decode(raw)
local reply
if outcome == 'done' then
  reply = transfer_reply(r, 'completed', ARGV[5])
else
  local st, ask = up_to_now(now, ARGV[2])
  if ask then return ask end
  local before = st.bal
  local restored, expired = restore(st, r.u, now)
  if before < 0 then take(math.min(restored, -before), nil) end
  local fields = { 'o', r.o, 'tf', r.id, 'u', r.u, 't', fmt(now) }
  if expired > 0 then fields[#fields + 1] = 'w'; fields[#fields + 1] = fmt(expired) end
  st.bal = st.bal + restored
  local id = append(st, 'v', restored, now, fields)
  redis.call('HSET', K_STATE, 'v:' .. r.o, id)
  save_state(st)
  reply = { 'REFUNDED', outcome, r.id, id }
end
redis.call('HDEL', KEYS[14], ARGV[3])
redis.call('ZREM', KEYS[15], KEYS[14] .. '#' .. ARGV[3])
if r.i ~= '' then remember(r.fp, ARGV[6], reply) end
return reply
