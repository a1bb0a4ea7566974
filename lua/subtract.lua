--[[ subtract.lua: take credits out, soonest-expiring buckets first, all or nothing.
KEYS  1-13 the user's keys (see _ledger.lua); 14 the idempotency record, when a key was given
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 amount | 4 fingerprint
      5 idempotency_ttl_ms | 6 idempotency_key ('' = none) | 7 metadata_json ('' = none)
      8 default_limits (the client's, for a user without its own; '' = none)
      9 member (who charges a pool; '' = the account itself)
Reply {'OK', id, kind 's', amount (-amount), balance_after, expire_at '', idempotency_key, metadata}
      | {'IDEM_CONFLICT'} | {'INSUFFICIENT', balance, credit_limit}
      | {'BUDGET', remaining, resets_at, retry_after_ms, budget, member ('' = the user's own)}
      | {'RATE', retry_after_ms, rate} (the user's limits)
      | PERIOD | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets, then one "s" entry (none when refused).
Counts as `used` in the cycle, and against the limits' rate and budget, and the member's cap.
Refusals in this order: credits, the member's cap, the budget, the rate.
]]
--!include _ledger.lua

local now, amount = clock(ARGV[1]), tonumber(ARGV[3])
local fingerprint, ikey, meta, member = ARGV[4], ARGV[6], ARGV[7], ARGV[9]

local prior = replay(fingerprint)
if prior then return prior end

local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
if st.bal - amount < -st.limit then
  save_state(st)
  return { 'INSUFFICIENT', fmt(st.bal), fmt(st.limit) }  -- summed by the client: exact
end
local counted, over = member_gate(st, member, now, amount)
if over then return over end
local plan, refused = gate(st, now, amount, ARGV[8])
if refused then return refused end
spend(plan)
if counted then redis.call(unpack(counted)) end

local parts = burn(st, amount)
st.bal = st.bal - amount
count_usage(st, now, 'cu', amount)
local fields = extras(nil, ikey, meta)
if parts ~= '' then fields[#fields + 1] = 'u'; fields[#fields + 1] = parts end
if member ~= '' then fields[#fields + 1] = 'mb'; fields[#fields + 1] = member end
local id = append(st, 's', -amount, now, fields)
save_state(st)
local reply = tx_reply(id, 's', -amount, st.bal, nil, ikey, meta)
remember(fingerprint, ARGV[5], reply)
return reply
