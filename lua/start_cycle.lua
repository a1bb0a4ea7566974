--[[ start_cycle.lua: start a cycle granting `amount` until its end; ends the running one first.
KEYS  1-13 the user's keys (see _ledger.lua); 14 the idempotency record, when a key was given
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries, for the running cycle)
      3 amount (0 allowed) | 4 duration_ms (a fixed period; '' for a calendar period)
      5 first_ends (calendar boundaries of the new cycle "B1,B2,...", calendar only)
      6 period (as given) | 7 tz | 8 renew (0|1) | 9 rollover ('' = all) | 10 fingerprint
      11 idempotency_ttl_ms | 12 idempotency_key ('' = none)
Reply cycle_reply (see _ledger.lua) | {'IDEM_CONFLICT'} | {'BALANCE_LIMIT', balance}
      | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: renewals, holds released by their ttl, expired buckets; the running cycle's grant minus what rolls over, as an "e"
entry; then one "c" entry for the new grant (rollover moves credits, it is not a new grant).
]]
--!include _ledger.lua

local now, amount = clock(ARGV[1]), tonumber(ARGV[3])
local fingerprint, ikey = ARGV[10], ARGV[12]

local prior = replay(fingerprint)
if prior then return prior end

local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
if amount > room(st) then
  save_state(st)
  return { 'BALANCE_LIMIT', fmt(st.bal) }
end

local c = load_cycle()
local carry, rolled = 0, {}
if c and c.cst ~= 'e' and now < tonumber(c.ce) then
  carry, rolled = close_grant(st, c, ARGV[9], now)
end

local ends_at, queue = nil, ''
if ARGV[4] ~= '' then
  ends_at = now + tonumber(ARGV[4])
else
  ends_at, queue = pop_list(ARGV[5])
end
c = {
  c0 = fmt(now), ck = '0', cs = fmt(now), ce = fmt(ends_at), ca = fmt(amount),
  cg = fmt(amount + carry), cu = '0', cad = '0', cst = 'a', crn = ARGV[8], cro = ARGV[9],
  cp = ARGV[6], ctz = ARGV[7], cdur = ARGV[4], cq = queue, cb = '',
}
local fill = amount + carry - repaid(st, amount)
if fill > 0 then c.cb = new_bucket(st, fill, ends_at, 0) end
st.bal = st.bal + amount
c.ci = append(st, 'c', amount, now, start_fields(ends_at, c.cb, rolled, ikey))
c.cs = fmt(st.ms)  -- the entry's time (later than now only if the clock stepped back)
save_cycle(c, st)
save_state(st)
local reply = cycle_reply(c, now)
remember(fingerprint, ARGV[11], reply)
return reply
