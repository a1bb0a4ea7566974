--[[ transfer_in.lua: a transfer's second step: give its credits to the destination, once (see
"Transfers" in _ledger.lua): a second call finds the marker and replies the same.
KEYS  1-13 the destination's keys (see _ledger.lua); 14 the transfer's marker
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries) | 3 transfer_id
      4 from_user | 5 amount | 6 parts (the source buckets it came from, in burn order)
      7 expire_at_ms ('' = each part keeps its bucket's expiry) | 8 created_ms (the transfer's
      start, ms) | 9 metadata_json ('' = none)
Reply {'OK', in_id, balance_after}
      | {'STALE', provable (1: it began over WINDOW_MS ago and was never taken: the source may
        have its credits back; 0: too old to tell, MARKER_MS)}
      | {'BALANCE_LIMIT', balance} (the balance plus held credits would pass 2^53-1)
      A refusal is kept as the marker too: every later call gets the same answer.
      | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: cycle renewals, holds released by their ttl, expired buckets, then one "i" entry (gs: the
buckets it made, tf: the transfer, fr: the source). As any grant, it repays a debt first; the rest
goes into one bucket per expiry (priority 0). Counts as granted in the usage rollups, not in the
cycle.
]]
--!include _ledger.lua

local now, amount = clock(ARGV[1]), tonumber(ARGV[5])
local expire_at, created = tonumber(ARGV[7]), tonumber(ARGV[8])

-- The answer is given once: a refusal is kept as the marker "!<code>|<value>", so that a later
-- call (a recovery racing the first) cannot take what the source is giving back meanwhile.
local function refuse(code, value)
  redis.call('SET', KEYS[14], '!' .. code .. '|' .. value, 'PX', MARKER_MS)
  return { code, value }
end

local marker = redis.call('GET', KEYS[14])
if marker then
  local first, second = string.match(marker, '^([^|]+)|(.+)$')
  if string.sub(first, 1, 1) == '!' then return { string.sub(first, 2), second } end
  return { 'OK', first, second }
end
if now > created + WINDOW_MS then
  if now < created + MARKER_MS - WINDOW_MS then return refuse('STALE', '1') end
  return { 'STALE', '0' }  -- a marker may have come and gone: nothing is proven, nothing kept
end

local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
if amount > room(st) then
  save_state(st)
  return refuse('BALANCE_LIMIT', fmt(st.bal))
end
-- The pieces by expiry, in burn order; the debt is repaid out of the soonest-expiring credits.
local skip, pieces = repaid(st, amount), {}
if expire_at then
  if amount > skip then pieces[1] = { expire_at, amount - skip } end
else
  for _, part in ipairs(split(ARGV[6], ';')) do
    local bucket, credits = string.match(part, '^([^:]+):([^:]+):')
    credits = tonumber(credits)
    local used = math.min(credits, skip)
    skip, credits = skip - used, credits - used
    if credits > 0 then
      local expiry = tonumber(string.sub(bucket, 1, 15))
      if expiry == NEVER then expiry = false end
      local last = pieces[#pieces]
      if last and last[1] == expiry then
        last[2] = last[2] + credits
      else
        pieces[#pieces + 1] = { expiry, credits }
      end
    end
  end
end
local made = {}
for i, piece in ipairs(pieces) do
  local bucket = new_bucket(st, piece[2], piece[1] or nil, 0)
  made[i] = bucket .. ':' .. fmt(piece[2]) .. ':0'
end
st.bal = st.bal + amount
local fields = extras(expire_at, '', ARGV[9])
for _, v in ipairs({ 'gs', table.concat(made, ';'), 'tf', ARGV[3], 'fr', ARGV[4] }) do
  fields[#fields + 1] = v
end
local id = append(st, 'i', amount, now, fields)
save_state(st)
redis.call('SET', KEYS[14], id .. '|' .. fmt(st.bal), 'PX', MARKER_MS)
return { 'OK', id, fmt(st.bal) }
