--[[ add.lua: grant credits in a new bucket.
KEYS  1-5 the user's keys (see _ledger.lua); 6 the idempotency record, when a key was given
ARGV  1 clock ('' = server TIME) | 2 amount | 3 expire_at ms or '' | 4 ttl ms or ''
      5 fingerprint | 6 idempotency retention ms | 7 idempotency key or '' | 8 metadata JSON or ''
Reply {'OK', id, 'a', amount, balance_after, expire_at, ikey, meta}
      | {'IDEM_CONFLICT'} | {'EXPIRY_PAST', now} | {'BALANCE_LIMIT', balance}
History: "e" entries for buckets that expired, then one "a" entry.
]]
--!include _ledger.lua

local now, amount = clock(ARGV[1]), tonumber(ARGV[2])
local expire_at = tonumber(ARGV[3])
local fingerprint, ikey, meta = ARGV[5], ARGV[7], ARGV[8]

local prior = replay(fingerprint)
if prior then return prior end

if ARGV[4] ~= '' then expire_at = now + tonumber(ARGV[4]) end
if expire_at and expire_at <= now then return { 'EXPIRY_PAST', fmt(now) } end

local st = load_state()
purge(st, now)
if st.bal + amount > MAX_CREDITS then
  save_state(st)
  return { 'BALANCE_LIMIT', fmt(st.bal) }
end

new_bucket(amount, expire_at, 0)
st.bal = st.bal + amount
local id = append(st, 'a', amount, now, extras(expire_at, ikey, meta))
save_state(st)
local reply = tx_reply(id, 'a', amount, st.bal, expire_at, ikey, meta)
remember(fingerprint, ARGV[6], reply)
return reply
