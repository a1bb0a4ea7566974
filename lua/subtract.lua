--[[ subtract.lua: take credits out, soonest-expiring buckets first, all or nothing.
KEYS  1-5 the user's keys (see _ledger.lua); 6 the idempotency record, when a key was given
ARGV  1 clock ('' = server TIME) | 2 amount | 3 fingerprint | 4 idempotency retention ms
      5 idempotency key or '' | 6 metadata JSON or ''
Reply {'OK', id, 's', -amount, balance_after, '', ikey, meta}
      | {'IDEM_CONFLICT'} | {'INSUFFICIENT', available}
History: "e" entries for buckets that expired, then one "s" entry (none when insufficient).
]]
--!include _ledger.lua

local now, amount = clock(ARGV[1]), tonumber(ARGV[2])
local fingerprint, ikey, meta = ARGV[3], ARGV[5], ARGV[6]

local prior = replay(fingerprint)
if prior then return prior end

local st = load_state()
purge(st, now)
if st.bal < amount then
  save_state(st)
  return { 'INSUFFICIENT', fmt(st.bal) }
end

burn(amount)
st.bal = st.bal - amount
local id = append(st, 's', -amount, now, extras(nil, ikey, meta))
save_state(st)
local reply = tx_reply(id, 's', -amount, st.bal, nil, ikey, meta)
remember(fingerprint, ARGV[4], reply)
return reply
