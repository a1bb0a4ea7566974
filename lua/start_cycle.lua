--[[ start_cycle.lua: start a billing cycle: grant `amount` credits expiring at the cycle's end.
KEYS  1-5 the user's keys (see _ledger.lua); 6 the idempotency record, when a key was given
ARGV  1 clock ('' = server TIME) | 2 amount (0 allowed) | 3 duration ms | 4 fingerprint
      5 idempotency retention ms | 6 idempotency key or ''
Reply {'OK', id, 'c', amount, balance_after, ends_at, ikey, '', started_at}
      | {'IDEM_CONFLICT'} | {'BALANCE_LIMIT', balance}
History: "e" entries for buckets that expired, then one "c" entry.
A previous cycle's unspent grant keeps its own expiry.
]]
--!include _ledger.lua

local now, amount, duration = clock(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local fingerprint, ikey = ARGV[4], ARGV[6]

local prior = replay(fingerprint)
if prior then return prior end

local st = load_state()
purge(st, now)
if st.bal + amount > MAX_CREDITS then
  save_state(st)
  return { 'BALANCE_LIMIT', fmt(st.bal) }
end

local ends_at = now + duration
if amount > 0 then new_bucket(amount, ends_at, 0) end
st.bal = st.bal + amount
local id = append(st, 'c', amount, now, extras(ends_at, ikey, ''))
local started_at = st.ms
redis.call('HSET', K_STATE, 'cs', fmt(started_at), 'ce', fmt(ends_at), 'ca', fmt(amount))
save_state(st)
local reply = tx_reply(id, 'c', amount, st.bal, ends_at, ikey, '')
reply[#reply + 1] = fmt(started_at)
remember(fingerprint, ARGV[5], reply)
return reply
