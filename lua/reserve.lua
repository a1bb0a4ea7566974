--[[ reserve.lua: hold credits for a charge whose size is known later (capture or release).
KEYS  1-13 the user's keys (see _ledger.lua); 14 the idempotency record, when a key was given
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 amount | 4 ttl_ms
      5 fingerprint | 6 idempotency_ttl_ms | 7 idempotency_key ('' = none)
      8 metadata_json ('' = none) | 9 default_limits (the client's; '' = none)
      10 member (who holds a pool's credits; '' = the account itself)
Reply hold_reply + {transaction_id (of the "r" entry)} | {'IDEM_CONFLICT'}
      | {'INSUFFICIENT', available}
      | {'BUDGET', remaining, resets_at, retry_after_ms, budget, member ('' = the user's own)}
      | {'RATE', retry_after_ms, rate}
      | PERIOD | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: renewals, holds released by their ttl, expired buckets, then one "r" entry (-amount).
Credits are taken from the available balance in burn order; a hold never uses the credit limit.
The held amount counts against the limits' rate and budget now (what is not captured comes back
to the budget, see capture.lua); so does the member's cap.
]]
--!include _ledger.lua

local now, amount, ttl = clock(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
local fingerprint, ikey, meta, member = ARGV[5], ARGV[7], ARGV[8], ARGV[10]

local prior = replay(fingerprint)
if prior then return prior end

local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
if amount > math.max(st.bal, 0) then
  save_state(st)
  return { 'INSUFFICIENT', fmt(math.max(st.bal, 0)) }
end
local counted, over = member_gate(st, member, now, amount)
if over then return over end
local plan, refused = gate(st, now, amount, ARGV[9])
if refused then return refused end
spend(plan)
if counted then redis.call(unpack(counted)) end

local parts = {}
take(amount, parts)
local hold_id = 'h' .. fmt(redis.call('HINCRBY', K_STATE, 'hs', 1))
st.bal = st.bal - amount
st.held = st.held + amount
local fields = extras(nil, ikey, meta)
fields[#fields + 1] = 'h'
fields[#fields + 1] = hold_id
if member ~= '' then fields[#fields + 1] = 'mb'; fields[#fields + 1] = member end
local id = append(st, 'r', -amount, now, fields)
local expires = now + ttl
local rec = { 'a', fmt(amount), fmt(expires), id, table.concat(parts, ';') }
if member ~= '' then rec[6] = member end
redis.call('HSET', K_HOLDS, hold_id, table.concat(rec, '|'))
hold_timer(st, hold_id, expires)
save_state(st)
local reply = hold_reply(hold_id, { 'a', rec[2], rec[3], rec[4], '0' })
reply[#reply + 1] = id
remember(fingerprint, ARGV[6], reply)
return reply
