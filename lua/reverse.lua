--[[ reverse.lua: undo a subtract, a capture or an add, once.
KEYS  1-13 the user's keys (see _ledger.lua); 14 the idempotency record, when a key was given
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 entry_id (the
      history entry to reverse) | 4 fingerprint | 5 idempotency_ttl_ms
      6 idempotency_key ('' = none) | 7 metadata_json ('' = none: why, kept in the entry)
Reply {'OK', id, kind 'v', amount, balance_after, expire_at '', idempotency_key, metadata,
       reversed_id (the entry reversed), unrestored, member (the reversed charge's; '' = none)}
      | {'IDEM_CONFLICT'} | {'NO_TX'} | {'ARCHIVED', trim mark} (moved to PostgreSQL)
      | {'NOT_REVERSIBLE', kind} | {'REVERSED', reversal id}
      | {'BALANCE_LIMIT', balance} (what would come back does not fit under 2^53-1)
      | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: renewals, holds released by their ttl, expired buckets, then one "v" entry linked (o) to
the entry it reverses.
- subtract / capture: the charged credits go back to the buckets they came from, except those of
  buckets whose expiry has come (w: not restored); a charge's overdraft part comes back as a new
  never-expiring bucket. As any grant, what comes back repays a debt first.
- add: what is left of that grant is removed (nothing, if it was spent or expired).
- The charge comes back to the limits' budget if it counted in the running period (a capture:
  if its hold is still remembered, a day after it ended, and counted; else nothing comes back);
  a member's charge (mb) to the member's cap the same way, and the "v" entry names the member.
]]
--!include _ledger.lua

local now, target = clock(ARGV[1]), ARGV[3]
local fingerprint, ikey = ARGV[4], ARGV[6]

local prior = replay(fingerprint)
if prior then return prior end

local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end

local found = redis.call('XRANGE', K_HISTORY, target, target)
if #found == 0 then
  save_state(st)
  local trimmed = redis.call('HGET', K_STATE, 'tm')
  if trimmed and id_less(target, trimmed) then return { 'ARCHIVED', trimmed } end
  return { 'NO_TX' }
end
local f = {}
for i = 1, #found[1][2], 2 do f[found[1][2][i]] = found[1][2][i + 1] end
if f.k ~= 'a' and f.k ~= 's' and f.k ~= 'p' then
  save_state(st)
  return { 'NOT_REVERSIBLE', f.k }
end
local done = redis.call('HGET', K_STATE, 'v:' .. target)
if done then
  save_state(st)
  return { 'REVERSED', done }
end

local fields, amount, unrestored = { 'o', target }, 0, 0
if f.k == 'a' then
  local left = 0
  if f.g then
    left = tonumber(redis.call('HGET', K_AMOUNTS, f.g)) or 0
    drop_bucket(f.g)
    fields[#fields + 1] = 'g'
    fields[#fields + 1] = f.g
  end
  amount = -left
else
  local charged = (f.k == 's' and -tonumber(f.n)) or tonumber(f.q)
  local from_buckets = 0
  for _, part in ipairs(split(f.u or '', ';')) do
    from_buckets = from_buckets + tonumber(string.match(part, '^[^:]+:([^:]+):'))
  end
  local overdraft = charged - from_buckets
  local coming = overdraft
  for _, part in ipairs(split(f.u or '', ';')) do
    local bucket, credits = string.match(part, '^([^:]+):([^:]+):')
    local expire_at = tonumber(string.sub(bucket, 1, 15))
    if expire_at == NEVER or expire_at > now then coming = coming + tonumber(credits) end
  end
  if coming > room(st) then
    save_state(st)
    return { 'BALANCE_LIMIT', fmt(st.bal) }
  end
  local before = st.bal
  local restored, expired = restore(st, f.u or '', now)
  if overdraft > 0 then
    fields[#fields + 1] = 'g'
    fields[#fields + 1] = new_bucket(st, overdraft, nil, 0)
  end
  if before < 0 then take(math.min(restored + overdraft, -before), nil) end
  amount, unrestored = restored + overdraft, expired
  local charged_by = target
  if f.k == 'p' then  -- the hold's "r" entry counted it, if the hold is still remembered
    charged_by = split(redis.call('HGET', K_HOLDS, f.h or '') or '', '|')[4]
  end
  budget_back(charged, charged_by, now)
  member_back(f.mb, charged, charged_by, now)
  if f.mb then fields[#fields + 1] = 'mb'; fields[#fields + 1] = f.mb end
  fields[#fields + 1] = 't'
  fields[#fields + 1] = fmt(now)
  if expired > 0 then fields[#fields + 1] = 'w'; fields[#fields + 1] = fmt(expired) end
end
if ikey ~= '' then fields[#fields + 1] = 'i'; fields[#fields + 1] = ikey end
local meta = ARGV[7] or ''
if meta ~= '' then fields[#fields + 1] = 'm'; fields[#fields + 1] = meta end
st.bal = st.bal + amount
local id = append(st, 'v', amount, now, fields)
redis.call('HSET', K_STATE, 'v:' .. target, id)
save_state(st)
local reply = tx_reply(id, 'v', amount, st.bal, nil, ikey, meta)
reply[#reply + 1] = target
reply[#reply + 1] = fmt(unrestored)
reply[#reply + 1] = f.mb or ''
remember(fingerprint, ARGV[5], reply)
return reply
