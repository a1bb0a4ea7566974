--[[ _ledger.lua: helpers shared by every ledger script. Included (--!include), never run alone.

Keys, built by credici_redis/_core/keys.py, in the same order for every script; all share one hash tag:
  KEYS[1] state    hash    bal (negative = debt), cl (credit limit), ms+sq (last history id),
                           seq (bucket counter), nx (no bucket expires before it), the cycle (c*),
                           archive: pn (entries not yet archived), ar (archived up to this id),
                           tm (entries before this id were trimmed away after archiving)
  KEYS[2] order    zset    bucket id -> priority; equal priorities sort by bucket id
  KEYS[3] expiry   zset    bucket id -> expire_at ms, expiring buckets only
  KEYS[4] amounts  hash    bucket id -> credits left, always > 0
  KEYS[5] history  stream  one entry per change: k kind, n signed amount, b balance after,
                           x expire_at ms, i idempotency key, m metadata JSON, and for the
                           audit (which replays the buckets from history): g the bucket a grant
                           made or an expiry hit, r credits rolled over from bucket f, u the
                           buckets a charge took from ("bucket:credits:priority;..."), holds: h
                           the hold, q captured, t the time a hold's parts came back; reversals:
                           o the entry reversed, w credits not restored (their bucket expired);
                           members: mb the member who charged (see "Members"); transfers
                           (see "Transfers"): tf the transfer, to / fr the other account, gs
                           the buckets a transfer in made ("bucket:credits:priority;...")
  KEYS[6] holds    hash    hold id -> "a|amount|expires|created|parts[|member]" while active,
                           then "<c(aptured) r(eleased) x (expired)>|amount|expires|created|
                           captured[|member]"
                           created: the id of the hold's "r" entry (older holds: its ms)
                           parts: "bucket:credits:priority;..." (where the held credits came from)
  KEYS[7] timers   zset    hold id -> when it is released by itself (active) or forgotten (done)
  KEYS[8] events   stream  low-balance events of the user's slot (shared by the users of the slot)
  KEYS[9] outbox   zset    the archive outbox of the user's slot (shared by its users): history
                           stream key -> ms of its oldest entry not yet archived to PostgreSQL
  KEYS[10] usage   hash    usage rollups: H<hour> and D<day> -> "spent:granted:expired:charges"
                           (see "Usage rollups" below)
  KEYS[11] checkpoint string  "<entry id>\n<JSON>": what the history up to that entry added up to,
                           written by trim.lua before it trims those entries (retention)
  KEYS[12] scratch  stream  the history's compact copy, made and renamed onto KEYS[5] by one
                           script (compact_history): never there between calls
  KEYS[13] members  hash    a pool's members: member -> "<cap>|<used>|<start>|<end>|<since>"
                           (see "Members" below)
  KEYS[14] idempotency record (string "<fingerprint>:<reply JSON>"), only when a key was given
           (the transfer scripts take more keys first: see "Transfers")
ARGV[1] is always the clock: '' means the server's TIME; tests inject milliseconds.
ARGV[2] is always "<cycle>|<budget>|<zone>", every part optional ('' = none of them):
  cycle   a schedule extension for a calendar cycle: "<index>:<ms>,<ms>,..." (the boundaries
          from that period index on, computed by the client after a SCHEDULE reply)
  budget  the budget periods the client computed after PERIOD replies (a user's budget, a
          member's cap): "<period>:<tz>=<start ms>,<end ms>;..."
  zone    the time zone of the usage days ('' = UTC) and its UTC offsets (with every call, and
          after a ZONE reply for a span further back):
          "<tz>=<valid until ms>;<from ms>:<offset ms>;..." (see "Usage rollups")

The cycle lives in the state hash:
  ci  id of its cycle_start entry   c0  schedule anchor (ms)     ck  period index (0 = first)
  cs  start (ms)   ce  end (ms)     ca  amount per period        cg  granted (amount + rollover)
  cu  used         cad added        cst status a(ctive) c(anceled) e(nded)
  crn renew 0|1    cro rollover ('' = all)   cp period as given   ctz time zone
  cdur fixed period (ms) or '' for a calendar period   cq calendar boundaries after ce ("ms,ms")
  cb  the bucket holding this cycle's grant ('' = none)
Boundaries are on the original schedule: B(k) = c0 + k * cdur, or the k-th calendar boundary.
A renewing fixed-period cycle idle for many periods gets one cycle_start entry for the periods
that started unseen (field v: how many, every cdur from its date on), not one per period.

Bounded work: every script brings the user up to now first (up_to_now), applying at most
MAX_EVENTS events; with more due it saves what it did and replies {'CATCHUP'}, and the client
sends the same call again (credici_redis/_core/protocol.py). Nothing but catch-up was written then.

A bucket id is "<expire_at ms, 15 digits, 999999999999999 = never><seq, 12 digits>", so the burn
order is: priority ascending, then soonest expiry, never-expiring last, ties oldest first.

Overdraft: with a credit limit, the balance may go down to -limit. The buckets always hold
max(balance, 0): a charge that takes the balance below 0 empties them, and a grant repays the debt
before it fills a bucket.

Numbers are Lua doubles (exact up to 2^53-1, the library's limit). Made into text, they are
written with fmt(), because tostring() and '..' switch to exponent notation past 14 digits; given
to redis.call as they are, Redis writes them itself ("%.17g": every integer up to 2^53 exactly,
and cheaper than fmt), which the hot path does for the fields it saves.
]]

local K_STATE, K_ORDER, K_EXPIRY, K_AMOUNTS, K_HISTORY, K_HOLDS, K_TIMERS, K_EVENTS, K_OUTBOX, K_USAGE
local K_CHECKPOINT, K_SCRATCH, K_MEMBERS, K_IDEM

-- The keys of this call: once per call (run as a script, here; in the Functions library, first
-- thing in every function, which is why this is a function).
local function bind(keys)
  K_STATE, K_ORDER, K_EXPIRY, K_AMOUNTS, K_HISTORY, K_HOLDS, K_TIMERS, K_EVENTS, K_OUTBOX, K_USAGE =
    keys[1], keys[2], keys[3], keys[4], keys[5], keys[6], keys[7], keys[8], keys[9], keys[10]
  K_CHECKPOINT, K_SCRATCH, K_MEMBERS, K_IDEM = keys[11], keys[12], keys[13], keys[14]
end
bind(KEYS)  --!script-only
local RETAIN = 86400000  -- a finished hold is remembered a day: a late second capture gets its answer
local MAX_CREDITS = 9007199254740991
local NEVER = 999999999999999
-- At most this many events (expiries, hold ttls, renewals) are applied by one script, and for at
-- most CATCHUP_US of the server's time (read every CHECK_EVERY events: a slow or busy server
-- takes fewer per step): more, and the script saves its progress and replies CATCHUP; the client
-- sends it again. Each step is atomic and in time order, and the operation itself runs only once
-- the user is up to now.
local MAX_EVENTS = 64
local CATCHUP_US, CHECK_EVERY = 2000, 8

local function micros()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function fmt(n)
  return string.format('%.0f', n)
end

-- Usage counters (see "Usage rollups") add up amounts past 2^53-1 (a day's grants may): a
-- counter is a Lua number while it is exact (|value| < 2^52), else a pair {hi, lo}, value =
-- hi * 10^12 + lo with 0 <= lo < 10^12, and is written in decimal either way.
local LIMB, EXACT = 1e12, 4503599627370496

local function limbs(x)
  if type(x) == 'table' then return x end
  local hi = math.floor(x / LIMB)
  return { hi, x - hi * LIMB }
end

local function plus(x, a)
  if type(x) == 'number' and type(a) == 'number' and math.abs(x) < EXACT and math.abs(a) < EXACT
  then
    return x + a
  end
  local p, q = limbs(x), limbs(a)
  local lo = p[2] + q[2]
  local carry = math.floor(lo / LIMB)
  local hi = p[1] + q[1] + carry
  lo = lo - carry * LIMB
  if math.abs(hi) < 4000 then return hi * LIMB + lo end  -- below 4 * 10^15: exact again
  return { hi, lo }
end

local function counter_text(x)
  if type(x) == 'number' then return fmt(x) end
  local hi, lo = x[1], x[2]
  if hi >= 0 then return fmt(hi) .. string.format('%012.0f', lo) end
  if lo > 0 then hi, lo = hi + 1, LIMB - lo end  -- -(|hi| - 1) * 10^12 - (10^12 - lo)
  return '-' .. fmt(-hi) .. string.format('%012.0f', lo)
end

local function counter_of(text)
  if not text then return 0 end
  if #text < 16 then return tonumber(text) end
  local sign, digits = string.match(text, '^(%-?)(%d+)$')
  if #digits <= 15 then return tonumber(text) end
  local x = { tonumber(string.sub(digits, 1, #digits - 12)), tonumber(string.sub(digits, -12)) }
  if sign == '' then return x end
  if x[2] == 0 then return { -x[1], 0 } end
  return { -x[1] - 1, LIMB - x[2] }
end

-- Stream ids "<ms>-<seq>" as numbers, to compare them.
local function id_parts(id)
  local ms, sq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(sq)
end

local function id_less(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end

local function clock(injected)
  if injected ~= '' then return tonumber(injected) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A user's keys are written together by every script; a state no script leaves is refused
-- before anything is written ({'INCONSISTENT', why}), never met with a Lua error halfway: every
-- bucket is in both the order zset and the amounts hash, and buckets have a state hash.
local function inconsistency(v)
  local buckets = redis.call('HLEN', K_AMOUNTS)
  if redis.call('ZCARD', K_ORDER) ~= buckets then
    return { 'INCONSISTENT', 'the bucket order and the bucket amounts differ' }
  end
  if buckets > 0 and not v[2] then
    return { 'INCONSISTENT', 'buckets without the state that counts them' }
  end
  return nil
end

local function load_state()
  local v = redis.call('HMGET', K_STATE, 'bal', 'ms', 'sq', 'ce', 'cst', 'nx', 'cl', 'hd', 'hx', 'lt',
    'lim', 'pn', 'ux', 'u1', 'u2', 'u3', 'u4')
  local bad = inconsistency(v)
  if bad then return nil, bad end
  return {
    bal = tonumber(v[1]) or 0, ms = tonumber(v[2]) or 0, sq = tonumber(v[3]) or 0, dirty = false,
    ce = tonumber(v[4]), cst = v[5] or nil, nx = tonumber(v[6]), limit = tonumber(v[7]) or 0,
    held = tonumber(v[8]) or 0, hx = tonumber(v[9]), holds_dirty = false, low = tonumber(v[10]),
    lim = v[11] or nil, pn = tonumber(v[12]) or 0,
    ux = tonumber(v[13]), u1 = counter_of(v[14]), u2 = counter_of(v[15]),
    u3 = counter_of(v[16]), u4 = counter_of(v[17]), saved_nx = tonumber(v[6]),
    -- which usage counters changed since the load (save_state writes only those)
    c1 = false, c2 = false, c3 = false, c4 = false,
  }
end

-- A counter as redis.call takes it: a number while it is exact, else its decimal text.
local function counter_arg(x)
  if type(x) == 'number' then return x end
  return counter_text(x)
end

-- One HSET for whatever changed: the balance and history position (with the usage counters of
-- the running slot that changed, and nx if it moved), the holds' total and next timer, and pn
-- (entries not yet archived: this script's appends counted in). Numbers go to redis.call as they
-- are (see the header): no fmt on the hot path.
local function put(args, field, value)
  args[#args + 1] = field
  args[#args + 1] = value
end

local function save_state(st)
  if not (st.dirty or st.holds_dirty) then return end
  local args = { 'HSET', K_STATE }
  if st.dirty then
    put(args, 'bal', st.bal); put(args, 'ms', st.ms); put(args, 'sq', st.sq)
    if st.nx ~= st.saved_nx then
      put(args, 'nx', st.nx or 0)
      st.saved_nx = st.nx
    end
    if st.ux then
      if st.c1 then put(args, 'u1', counter_arg(st.u1)) end
      if st.c2 then put(args, 'u2', counter_arg(st.u2)) end
      if st.c3 then put(args, 'u3', counter_arg(st.u3)) end
      if st.c4 then put(args, 'u4', counter_arg(st.u4)) end
      st.c1, st.c2, st.c3, st.c4 = false, false, false, false
    end
    st.dirty = false  -- saved: a second save_state writes nothing again
  end
  if st.holds_dirty then
    put(args, 'hd', st.held); put(args, 'hx', st.hx or 0)
    st.holds_dirty = false
  end
  if st.appended then
    st.pn = st.pn + st.appended
    put(args, 'pn', st.pn)
    st.appended = nil
  end
  redis.call(unpack(args))
end

-- With a low-balance threshold set: a change that takes the balance from >= threshold to below
-- it is a "low_balance" event, one that takes it from above 0 to 0 or less a "depleted" event,
-- written by the same script as the change (never lost, never twice).
local function notice(st, amount, entry_id)
  local after = st.bal
  local before = after - amount
  local kinds = {}
  if before >= st.low and after < st.low then kinds[#kinds + 1] = 'low_balance' end
  if before > 0 and after <= 0 then kinds[#kinds + 1] = 'depleted' end
  for _, kind in ipairs(kinds) do
    redis.call('XADD', K_EVENTS, '*', 't', kind, 'h', K_HISTORY, 'e', entry_id,
      'b', fmt(after), 'l', fmt(st.low))
  end
end

-- ---------------------------------------------------------------------------------------------
-- Usage rollups: every history entry is counted, by the script that appends it, into the usage
-- of its hour (UTC) and of its day (in the zone of ARGV[2]'s third part, UTC by default):
--   spent    credits charged, net of what came back: -n of subtract, reserve, capture, release
--            entries, and of reversals that give credits back (n > 0)
--   granted  n of add and cycle_start entries, and of reversals that take credits back (n < 0)
--   expired  -n of expire entries
--   charges  how many subtract and reserve entries
-- so that granted - spent - expired is what the balance rose by, over any span of entries.
-- The running "slot" (the entries of one hour and one day: a day in a zone 30 minutes off UTC
-- starts within an hour) is counted in the state hash, saved with the balance (no command of its
-- own): u1 spent, u2 granted, u3 expired, u4 charges, ux the slot's end (ms), uh its hour, ud its
-- day. The first entry past ux closes it (fold): its counts are added into the records
--   K_USAGE  H<hour> and D<day>   "spent:granted:expired:charges"
-- (hour = ms // 3,600,000; day = days from 1970-01-01 to the local date), once an hour at most.
-- Records are kept KEEP_HOURS hours and KEEP_DAYS days from the newest: each fold drops those
-- that fell out (state: ul/ql the lowest hour/day that may have a record, up/uq the last dropped,
-- u0 where counting began: 0 when the user had no history before it).
-- A zone's days come from its UTC offsets, which Lua cannot know: the client sends them with its
-- calls (from two days back), and for a user whose entries reach further back after a ZONE reply
-- ({'ZONE', tz, from ms, to ms}: nothing written before it); valid until a given time (state: uz
-- zone, uv valid until, uo "<from>:<offset>;..."). A UTC day needs none. The table holds about
-- two changes a year of the span asked, so it grows only with a user's idle years.
local HOUR, DAY = 3600000, 86400000
local KEEP_HOURS, KEEP_DAYS = 168, 400

-- The zone part of ARGV[2]: zone, and the offsets the client sent with it (or nil).
local function zone_arg(extension)
  local part = string.match(extension, '^[^|]*|[^|]*|(.*)$') or ''
  if part == '' then return 'UTC', nil, nil end
  local eq = string.find(part, '=', 1, true)
  if not eq then return part, nil, nil end
  local body = string.sub(part, eq + 1)
  local semi = string.find(body, ';', 1, true)
  return string.sub(part, 1, eq - 1), tonumber(string.sub(body, 1, semi - 1)),
    string.sub(body, semi + 1)
end

local function parse_offsets(text)
  local out = {}
  for from, off in string.gmatch(text, '(%-?%d+):(%-?%d+)') do
    out[#out + 1] = { tonumber(from), tonumber(off) }
  end
  return out
end

-- The day (days since 1970-01-01 of the local date) of `ms`, and when that day ends (ms).
local function day_of(zone, ms)
  if not zone then
    local d = math.floor(ms / DAY)
    return d, (d + 1) * DAY
  end
  local i = 1
  while zone[i + 1] and zone[i + 1][1] <= ms do i = i + 1 end
  local d = math.floor((ms + zone[i][2]) / DAY)
  local midnight = (d + 1) * DAY
  while true do  -- the first instant whose local time reaches the next midnight
    local ends = math.max(zone[i][1], midnight - zone[i][2])
    if not zone[i + 1] or ends < zone[i + 1][1] then return d, ends end
    i = i + 1
  end
end

-- Before anything is written: the zone's offsets must cover every entry this call may append
-- (from the last one's ms to now). Loads them into st.zone (nil: UTC); or returns the ZONE ask.
local function usage_zone(st, now, extension)
  local upto = math.max(now, st.ms)
  if st.ux and upto < st.ux then return nil end  -- no slot ends in this call
  local tz, until_ms, offsets = zone_arg(extension)
  st.usage_tz = tz
  if tz == 'UTC' then return nil end
  local v = redis.call('HMGET', K_STATE, 'uz', 'uv', 'uo')
  if v[1] == tz and tonumber(v[2]) and upto < tonumber(v[2]) then
    st.zone = parse_offsets(v[3])
    return nil
  end
  local from = (st.ms > 0 and math.min(st.ms, now)) or now
  if until_ms and upto < until_ms then
    local zone = parse_offsets(offsets)
    if zone[1] and zone[1][1] <= from then
      local fields = { 'uz', tz, 'uv', fmt(until_ms), 'uo', offsets }
      -- a user without history gets no state by a read: the first fold saves them then
      if st.ms > 0 then redis.call('HSET', K_STATE, unpack(fields)) else st.zone_fields = fields end
      st.zone = zone
      return nil
    end
  end
  return { 'ZONE', tz, fmt(from), fmt(upto) }
end

-- Record i of `values` ("s:g:x:c" or nil) plus counts `s`, as a record.
local function add_record(values, i, s)
  local old = values[i]
  if old then
    local o = {}
    for n in string.gmatch(old, '[^:]+') do o[#o + 1] = counter_of(n) end
    s = { plus(o[1], s[1]), plus(o[2], s[2]), plus(o[3], s[3]), plus(o[4], s[4]) }
  end
  return counter_text(s[1]) .. ':' .. counter_text(s[2]) .. ':' .. counter_text(s[3]) .. ':'
    .. counter_text(s[4])
end

-- Drops the records of `prefix` numbered from `low` to `upto` (at most KEEP_DAYS of them).
local function drop_records(prefix, low, upto)
  if upto < low then return end
  local names = { 'HDEL', K_USAGE }
  for n = low, upto do names[#names + 1] = prefix .. fmt(n) end
  redis.call(unpack(names))
end

-- The slot of entry `ms` begins: the running one's counts go into its hour and day records.
local function fold(st, ms)
  local v = redis.call('HMGET', K_STATE, 'uh', 'ud', 'ul', 'ql', 'u0')
  local hour, day = tonumber(v[1]), tonumber(v[2])
  local counts = { st.u1, st.u2, st.u3, st.u4 }
  local nh = math.floor(ms / HOUR)
  local nd, day_ends = day_of(st.zone, ms)
  local fields = { 'HSET', K_STATE, 'uh', fmt(nh), 'ud', fmt(nd) }
  for _, f in ipairs(st.zone_fields or { 'uz', st.usage_tz or 'UTC' }) do fields[#fields + 1] = f end
  if hour and (counts[1] ~= 0 or counts[2] ~= 0 or counts[3] ~= 0 or counts[4] ~= 0) then
    local h, d = 'H' .. fmt(hour), 'D' .. fmt(day)
    local old = redis.call('HMGET', K_USAGE, h, d)
    redis.call('HSET', K_USAGE, h, add_record(old, 1, counts), d, add_record(old, 2, counts))
  end
  local low_hour, low_day = tonumber(v[3]), tonumber(v[4])
  if not low_hour then  -- the first slot: counting begins
    low_hour, low_day = nh, nd
    fields[#fields + 1] = 'u0'
    fields[#fields + 1] = (st.ms == 0 and '0') or fmt(ms)
  end
  local cut_hour, cut_day = nh - KEEP_HOURS, nd - KEEP_DAYS
  if low_hour <= cut_hour then
    drop_records('H', low_hour, math.min(cut_hour, hour or cut_hour))
    low_hour = cut_hour + 1
    fields[#fields + 1] = 'up'; fields[#fields + 1] = fmt(cut_hour)
  end
  if low_day <= cut_day then
    drop_records('D', low_day, math.min(cut_day, day or cut_day))
    low_day = cut_day + 1
    fields[#fields + 1] = 'uq'; fields[#fields + 1] = fmt(cut_day)
  end
  fields[#fields + 1] = 'ul'; fields[#fields + 1] = fmt(low_hour)
  fields[#fields + 1] = 'ql'; fields[#fields + 1] = fmt(low_day)
  st.ux = math.min((nh + 1) * HOUR, day_ends)
  fields[#fields + 1] = 'ux'; fields[#fields + 1] = fmt(st.ux)
  redis.call(unpack(fields))
  st.u1, st.u2, st.u3, st.u4 = 0, 0, 0, 0
  st.c1, st.c2, st.c3, st.c4 = true, true, true, true
end

-- Counts entry (kind, amount) at `ms` into the running slot (saved by save_state).
local function count(st, kind, amount, ms)
  if not st.ux or ms >= st.ux then fold(st, ms) end
  if kind == 'd' then return end  -- a credit limit's change moves no credits
  if kind == 'e' then
    st.u3, st.c3 = plus(st.u3, -amount), true
  elseif kind == 'a' or kind == 'c' or kind == 'i' or (kind == 'v' and amount < 0) then
    st.u2, st.c2 = plus(st.u2, amount), true
  else
    st.u1, st.c1 = plus(st.u1, -amount), true
    if kind == 's' or kind == 'r' then st.u4, st.c4 = plus(st.u4, 1), true end
  end
end

-- The id the next history entry dated `at` gets (see append).
local function next_id(st, at)
  if at <= st.ms then return fmt(st.ms) .. '-' .. fmt(st.sq + 1) end
  return fmt(at) .. '-0'
end

-- A stream's first node: Redis allocates it whole up front (stream-node-max-bytes, 4 KB by
-- default), so a user with a few history entries would cost 4 KB of them. COPY makes the node
-- exactly as big as its entries, and later entries grow it as they come (a node that fills up is
-- shrunk by Redis itself, so only the first, or the first after the history was trimmed away,
-- needs this). Made by the first append of a call that finds the stream holding only its entry.
-- Optional: an ACL without XLEN, COPY or RENAME (docs/security.md) only forgoes it (pcall; and
-- RENAME of the missing scratch key answers "no such key" only where the ACL allows RENAME, so
-- no copy is made that could not be renamed back).
local function compact_history()
  if redis.pcall('XLEN', K_HISTORY) ~= 1 then return end
  local probe = redis.pcall('RENAME', K_SCRATCH, K_SCRATCH)
  if type(probe) ~= 'table' or not probe.err
    or not string.find(tostring(probe.err), 'no such key', 1, true)
  then
    return
  end
  if redis.pcall('COPY', K_HISTORY, K_SCRATCH, 'REPLACE') == 1 then
    local renamed = redis.pcall('RENAME', K_SCRATCH, K_HISTORY)
    if type(renamed) == 'table' and renamed.err then redis.pcall('DEL', K_SCRATCH) end
  end
end

-- Appends a history entry dated `at` and returns its id. Ids only grow: an entry dated before
-- the last one (a clock step back) is dated at the last one's millisecond, with the next seq.
local function append(st, kind, amount, at, extra)
  local ms, sq = at, 0
  if ms <= st.ms then ms, sq = st.ms, st.sq + 1 end
  local id = fmt(ms) .. '-' .. fmt(sq)
  local args = { 'XADD', K_HISTORY, id, 'k', kind, 'n', amount, 'b', st.bal }
  for i = 1, #extra do args[#args + 1] = extra[i] end
  redis.call(unpack(args))
  count(st, kind, amount, ms)
  st.ms, st.sq, st.dirty = ms, sq, true
  -- The archive's outbox learns that this user has something to archive (from ms on, at the
  -- latest: NX keeps an earlier mark), in the user's own slot. With entries pending already
  -- (pn > 0) the user is in it: archive_done.lua drops a user only once none is pending.
  if not st.appended then
    if st.pn <= 0 then redis.call('ZADD', K_OUTBOX, 'NX', ms, K_HISTORY) end
    compact_history()
    st.appended = 0
  end
  st.appended = st.appended + 1
  if st.low then notice(st, amount, id) end
  return id
end

local function new_bucket(st, amount, expire_at, priority)
  local seq = redis.call('HINCRBY', K_STATE, 'seq', 1)
  local id = string.format('%015.0f%012.0f', expire_at or NEVER, seq)
  redis.call('ZADD', K_ORDER, priority, id)
  if expire_at then
    redis.call('ZADD', K_EXPIRY, fmt(expire_at), id)
    if not st.nx or expire_at < st.nx then st.nx, st.dirty = expire_at, true end
  end
  redis.call('HSET', K_AMOUNTS, id, fmt(amount))
  return id
end

local function drop_bucket(id)
  redis.call('ZREM', K_ORDER, id)
  redis.call('ZREM', K_EXPIRY, id)
  redis.call('HDEL', K_AMOUNTS, id)
end

-- A bucket's expiry has come (it is usable while now < expire_at): what was left in it is
-- recorded as an "expire" entry dated at its expiry. Each bucket expires once, so the cost is
-- amortized over the grants.
local function expire_bucket(st, id, at)
  local left = tonumber(redis.call('HGET', K_AMOUNTS, id)) or 0
  drop_bucket(id)
  if left > 0 then
    st.bal = st.bal - left
    append(st, 'e', -left, at, { 'x', fmt(at), 'g', id })
  end
end

-- Credits that may still come in: the balance plus what holds hold stays within 2^53-1, so
-- nothing that comes back (a release, a reversal) can pass it.
local function room(st)
  return MAX_CREDITS - st.bal - st.held
end

-- The part of a grant that repays debt; the rest goes into a bucket.
local function repaid(st, amount)
  return math.min(amount, math.max(-st.bal, 0))
end

-- Takes `need` credits out of the buckets in burn order; with `parts`, notes where each came
-- from ("bucket:credits:priority"). The caller knows the buckets hold at least `need`.
local function take(need, parts)
  if need <= 0 then return end
  -- Usually the first bucket is enough: one HINCRBY takes the credits and says what is left.
  local first = redis.call('ZRANGE', K_ORDER, 0, 0, 'WITHSCORES')
  local after = redis.call('HINCRBY', K_AMOUNTS, first[1], -need)
  if parts then
    parts[#parts + 1] = first[1] .. ':' .. fmt(math.min(after + need, need)) .. ':' .. first[2]
  end
  if after > 0 then return end
  drop_bucket(first[1])
  need = -after  -- what the first bucket lacked
  while need > 0 do
    local got = redis.call('ZRANGE', K_ORDER, 0, 31, 'WITHSCORES')
    local ids = {}
    for i = 1, #got, 2 do ids[#ids + 1] = got[i] end
    local lefts = redis.call('HMGET', K_AMOUNTS, unpack(ids))
    for i = 1, #ids do
      local left = tonumber(lefts[i])
      if parts then
        parts[#parts + 1] = ids[i] .. ':' .. fmt(math.min(left, need)) .. ':' .. got[2 * i]
      end
      if left > need then
        redis.call('HSET', K_AMOUNTS, ids[i], left - need)
        return
      end
      drop_bucket(ids[i])
      need = need - left
      if need == 0 then return end
    end
  end
end

-- A charge: out of the buckets as far as they hold credits (past that, it is debt). The buckets
-- hold max(balance, 0), so they always have enough. Returns where the credits came from.
local function burn(st, amount)
  local parts = {}
  take(math.min(amount, math.max(st.bal, 0)), parts)
  return table.concat(parts, ';')
end

-- The reply every operation that records a change returns; also what an idempotency record keeps.
-- Reply {'OK', id, kind, amount, balance_after, expire_at, idempotency_key, metadata}
local function tx_reply(id, kind, amount, bal, expire_at, ikey, meta)
  return { 'OK', id, kind, fmt(amount), fmt(bal), expire_at and fmt(expire_at) or '', ikey, meta }
end

-- ---------------------------------------------------------------------------------------------
-- Transfers: credits move from one account to another, in whatever slots they are, in three
-- scripts (credici_redis/_ops/transfers.py drives them): transfer_out.lua takes them out of the
-- source ("o" entry) and writes the transfer's record (JSON, a field of the source's record hash:
-- see transfer_reply), queued in the slot's transfer queue; transfer_in.lua gives them to the
-- destination ("i" entry), once: its marker (string "<entry id>|<balance after>", kept
-- MARKER_MS) answers any second call; transfer_settle.lua ends the record: done, or the credits
-- go back to the source ("v" entry reversing the "o" one) when the destination refused them.
-- The destination takes a transfer only until WINDOW_MS after it began; past that, a call that
-- finds no marker proves it never took it (until MARKER_MS - WINDOW_MS: a marker outlives any
-- take), so the source may have its credits back.
local WINDOW_MS, MARKER_MS = 86400000, 7 * 86400000

-- Reply {'OK', transfer_id, record_id, status, from_user, to_user, amount, created_at, out_id,
--        in_id, expire_at, idempotency_key, metadata, parts}
local function transfer_reply(r, status, in_id)
  return { 'OK', r.id, r.rid, status, r.from, r.to, r.n, r.t, r.o, in_id, r.x, r.i, r.m, r.u }
end

-- With an idempotency record: the stored reply if the request is the same, a conflict if not.
local function replay(fingerprint)
  if not K_IDEM then return nil end
  local rec = redis.call('GET', K_IDEM)
  if not rec then return nil end
  local sep = string.find(rec, ':', 1, true)
  if string.sub(rec, 1, sep - 1) ~= fingerprint then return { 'IDEM_CONFLICT' } end
  return cjson.decode(string.sub(rec, sep + 1))
end

local function remember(fingerprint, ttl_ms, reply)
  if K_IDEM then
    redis.call('SET', K_IDEM, fingerprint .. ':' .. cjson.encode(reply), 'PX', ttl_ms)
  end
end

-- History fields every change may carry beyond k, n, b.
local function extras(expire_at, ikey, meta)
  local e = {}
  if expire_at then e[#e + 1] = 'x'; e[#e + 1] = fmt(expire_at) end
  if ikey ~= '' then e[#e + 1] = 'i'; e[#e + 1] = ikey end
  if meta ~= '' then e[#e + 1] = 'm'; e[#e + 1] = meta end
  return e
end

-- ---------------------------------------------------------------------------------------------
-- Cycles

local CYCLE_FIELDS = { 'ci', 'c0', 'ck', 'cs', 'ce', 'ca', 'cg', 'cu', 'cad', 'cst', 'crn', 'cro',
                       'cp', 'ctz', 'cdur', 'cq', 'cb' }

local function load_cycle()
  local v = redis.call('HMGET', K_STATE, unpack(CYCLE_FIELDS))
  if not v[1] then return nil end
  local c = {}
  for i = 1, #CYCLE_FIELDS do c[CYCLE_FIELDS[i]] = v[i] or '' end
  return c
end

local function save_cycle(c, st)
  local args = { 'HSET', K_STATE }
  for i = 1, #CYCLE_FIELDS do
    args[#args + 1] = CYCLE_FIELDS[i]
    args[#args + 1] = c[CYCLE_FIELDS[i]]
  end
  redis.call(unpack(args))
  st.ce, st.cst = tonumber(c.ce), c.cst
end

-- What rollover keeps of an unspent grant: '' = all of it, else at most N.
local function carried(rollover, left)
  if rollover == '' then return left end
  return math.min(left, tonumber(rollover))
end

-- Ends the current grant at `at`: keeps `carry` of it and records the rest as expired.
-- Returns the carry and the history fields that say where it came from.
local function close_grant(st, c, rollover, at)
  local old = c.cb
  if old == '' then return 0, {} end
  local left = tonumber(redis.call('HGET', K_AMOUNTS, old)) or 0
  drop_bucket(old)
  c.cb = ''
  local carry = carried(rollover, left)
  if left > carry then
    st.bal = st.bal - (left - carry)
    append(st, 'e', -(left - carry), at, { 'x', c.ce, 'g', old })
  end
  if carry == 0 then return 0, {} end
  return carry, { 'r', fmt(carry), 'f', old }
end

-- The fields of a cycle_start entry: its end, the grant's bucket, and any rollover into it.
local function start_fields(ends_at, bucket, rolled, ikey)
  local e = { 'x', fmt(ends_at) }
  if bucket ~= '' then e[#e + 1] = 'g'; e[#e + 1] = bucket end
  for i = 1, #rolled do e[#e + 1] = rolled[i] end
  if ikey ~= '' then e[#e + 1] = 'i'; e[#e + 1] = ikey end
  return e
end

local function count_list(q)
  if q == '' then return 0 end
  local _, commas = string.gsub(q, ',', ',')
  return commas + 1
end

local function last_of(q)
  return tonumber(string.match(q, '([^,]+)$'))
end

local function pop_list(q)
  local comma = string.find(q, ',', 1, true)
  if not comma then return tonumber(q), '' end
  return tonumber(string.sub(q, 1, comma - 1)), string.sub(q, comma + 1)
end

-- Calendar cycles: take the client's extension if it starts where the queue ends; then the queue
-- must reach past `now`, or the client is asked (SCHEDULE) before anything is written.
local function ensure_schedule(c, now, extension)
  extension = string.match(extension, '^[^|]*')  -- the cycle's part (a budget period follows '|')
  local have = count_list(c.cq)
  local first_missing = tonumber(c.ck) + 2 + have
  if extension ~= '' then
    local colon = string.find(extension, ':', 1, true)
    if tonumber(string.sub(extension, 1, colon - 1)) == first_missing then
      local more = string.sub(extension, colon + 1)
      c.cq = (c.cq == '' and more) or (c.cq .. ',' .. more)
      have = count_list(c.cq)
      first_missing = tonumber(c.ck) + 2 + have
    end
  end
  if have > 0 and last_of(c.cq) > now then return nil end
  return { 'SCHEDULE', fmt(now), c.c0, fmt(first_missing), c.cp, c.ctz }
end

-- The first expiry of a bucket other than `except` (the cycle's grant, which ends on the next
-- boundary) and the first hold timer: nothing else can happen before the sooner of the two.
local function next_other_event(except)
  local first = redis.call('ZRANGE', K_EXPIRY, 0, 1, 'WITHSCORES')
  local at = NEVER
  if first[1] and first[1] ~= except then at = tonumber(first[2])
  elseif first[3] then at = tonumber(first[4]) end
  local timer = redis.call('ZRANGE', K_TIMERS, 0, 0, 'WITHSCORES')
  if timer[2] and tonumber(timer[2]) < at then at = tonumber(timer[2]) end
  return at
end

-- How many periods a renewal at the cycle's end starts: 1, or, for a fixed period, every period
-- from there on that also ends by `now` and before any other event (at the same ms the boundary
-- goes first). Those grant 0 and only roll the grant bucket over, so they start at once.
local function periods_to_start(c, now)
  if c.cdur == '' then return 1 end
  local dur, ends = tonumber(c.cdur), tonumber(c.ce)
  local limit = math.min(now - dur, next_other_event(c.cb))
  if limit < ends + dur then return 1 end
  return math.floor((limit - ends) / dur) + 1
end

-- A renewing cycle reaches its end (c.ce <= now): it rolls its grant over and starts the next
-- period on the original schedule, with one cycle_start entry dated at the boundary. Only the
-- period containing `now` gets its grant; periods that pass unseen grant 0, and a run of them
-- shares one entry (field v: how many) instead of one each.
local function renew(st, c, now)
  local ends = tonumber(c.ce)
  local periods = periods_to_start(c, now)
  local carry, rolled = close_grant(st, c, c.cro, ends)
  local k = tonumber(c.ck) + periods
  local starts, next_end = ends, nil
  if c.cdur ~= '' then
    starts = ends + (periods - 1) * tonumber(c.cdur)
    next_end = tonumber(c.c0) + (k + 1) * tonumber(c.cdur)
  else
    next_end, c.cq = pop_list(c.cq)
  end
  local grant = 0
  if next_end > now then grant = math.max(math.min(tonumber(c.ca), room(st)), 0) end
  local fill = grant + carry - repaid(st, grant)
  if fill > 0 then c.cb = new_bucket(st, fill, next_end, 0) end
  st.bal = st.bal + grant
  local fields = start_fields(next_end, c.cb, rolled, '')
  if periods > 1 then
    fields[#fields + 1] = 'v'
    fields[#fields + 1] = fmt(periods)
  end
  c.ci = append(st, 'c', grant, ends, fields)
  c.ck, c.cs, c.ce = fmt(k), fmt(starts), fmt(next_end)
  c.cg, c.cu, c.cad = fmt(grant + carry), '0', '0'
end

-- Counts usage against the cycle running at `now` (field cu: used, cad: added).
local function count_usage(st, now, field, amount)
  if st.ce and st.cst ~= 'e' and now < st.ce then
    redis.call('HINCRBY', K_STATE, field, amount)
  end
end

-- Reply {'OK', cycle_id, started_at, ends_at, amount, granted, used, added, status, renew,
--        rollover, period, tz}
local function cycle_reply(c, now)
  local status = c.cst
  if now >= tonumber(c.ce) then status = 'e' end
  return { 'OK', c.ci, c.cs, c.ce, c.ca, c.cg, c.cu, c.cad, status, c.crn, c.cro, c.cp, c.ctz }
end

-- ---------------------------------------------------------------------------------------------
-- Limits: a rate (GCRA, cost-weighted: a charge of n credits uses n units) and a spending budget
-- per period; the user's own (state field lim, set by set_limits.lua) or else the client's
-- default (an ARGV of the scripts that charge). A spec is "R<amount>:<per ms>:<burst>" and/or
-- "B<amount>:<period>:<tz>" (period day|week|month|year, or a fixed window in ms counted from
-- the Unix epoch), joined by ';'; credici_redis/_ops/limits.py makes and checks them.
-- Usage, in the state hash:
--   rb  ms of the rate's last charge   ro  how far the rate's theoretical arrival time (TAT) was
--       ahead of rb, in ticks of 1/amount ms (integers: exact)   rk  the rate spec it counts for
--   bu  credits spent in the budget period   bs, be  the period (start, end ms)
--   bc  the first history id counted (the period's start, or the first entry after this budget
--       began)   bk  "period:tz" counted
--   bf  the first history id any budget may count: set by set_limits.lua, so that a charge made
--       while the user had no budget (or another one) never gives budget back
-- A change of the rate spec starts the rate afresh; a change of the budget's period or zone
-- starts the budget afresh (a new amount alone keeps what was spent). Checks and refusals change
-- nothing; give-backs (a capture under its hold, a release, a hold's ttl, a reversal) return
-- budget spent in the current period from bc on, never rate.

local USAGE = { 'rb', 'ro', 'rk', 'bu', 'bs', 'be', 'bc', 'bk', 'bf' }

local function parse_limits(spec)
  local lim = nil
  for part in string.gmatch(spec or '', '[^;]+') do
    lim = lim or {}
    local a, b, c = string.match(part, '^%a(%d+):([^:]+):(.*)$')
    if string.sub(part, 1, 1) == 'R' then
      lim.ra, lim.rp, lim.rs, lim.rk = tonumber(a), tonumber(b), tonumber(c), part
    else
      lim.ba, lim.bp, lim.bz, lim.bk = tonumber(a), b, c, b .. ':' .. c
    end
  end
  return lim
end

-- The limits in effect: the user's own, else the default; nil for none.
local function limits_of(st, default)
  if st.lim then return parse_limits(st.lim), st.lim end
  return parse_limits(default), default
end

local function load_usage()
  local v = redis.call('HMGET', K_STATE, unpack(USAGE))
  return { rb = tonumber(v[1]), ro = tonumber(v[2]), rk = v[3] or nil, bu = tonumber(v[4]) or 0,
           bs = tonumber(v[5]), be = tonumber(v[6]), bc = v[7] or nil, bk = v[8] or nil,
           bf = v[9] or nil }
end

-- The rate at `now` for a charge of n: true and how far the TAT is ahead of now after it (ticks),
-- or false and when it would pass (ms; '' = never: n is more than the burst).
local function rate_after(lim, u, now, n)
  local per, burst = lim.rp, lim.rs
  if n > burst then return false, '' end
  local ahead = 0
  if u.rk == lim.rk and u.ro then
    local elapsed = math.max(now - u.rb, 0)  -- a clock step back does not run the rate backwards
    if elapsed <= math.floor(u.ro / lim.ra) then ahead = u.ro - elapsed * lim.ra end
  end
  local after = ahead + n * per
  if after > burst * per then return false, fmt(math.ceil((after - burst * per) / lim.ra)) end
  return true, after
end

-- A calendar period of ARGV[2]'s budget part (the client's answers to PERIOD replies) for budget
-- `tag` ("<period>:<tz>") that contains `now`: start, end; or nil.
local function asked_period(tag, now)
  local part = string.match(ARGV[2], '^[^|]*|([^|]*)') or ''
  for t, s, e in string.gmatch(part, '([^;=]+)=(%d+),(%d+)') do
    if t == tag and tonumber(s) <= now and now < tonumber(e) then return tonumber(s), tonumber(e) end
  end
  return nil
end

-- The period of budget `lim` (a user's budget, a member's cap) containing `now`, given the one
-- counted so far (its tag, start, end): start, end, whether it is a new one (nothing spent yet);
-- or nil and the reply asking the client for a calendar period (after a save: nothing else was
-- written). The client's answer comes in ARGV[2]'s budget part (asked_period).
local function period_at(st, lim, tag, s, e, now)
  if tag == lim.bk and e and now < e then return s, e, false end
  local dur = tonumber(lim.bp)
  if dur then
    local start = now - now % dur
    return start, start + dur, true
  end
  local ps, pe = asked_period(lim.bk, now)
  if ps then return ps, pe, true end
  save_state(st)
  return nil, { 'PERIOD', fmt(now), lim.bp, lim.bz }
end

local function budget_period(st, lim, u, now)
  return period_at(st, lim, u.bk, u.bs, u.be, now)
end

-- May a charge of n go ahead at `now` under the limits in effect? Returns the plan of what it
-- uses (nil: the user has no limits), or nil and the refusal (or PERIOD ask) to reply. Budget
-- refuses before rate (its wait is the longer); credits were checked before, by the caller.
-- Refusals: {'BUDGET', remaining, resets_at ms, retry_after ms, budget spec}
--         | {'RATE', retry_after ms ('' = never), rate spec}
local function gate(st, now, n, default)
  if not st.lim and (not default or default == '') then return nil, nil end  -- no limits
  local lim = limits_of(st, default)
  if not lim then return nil, nil end
  local u = load_usage()
  local plan = {}
  if lim.ba then
    local start, ends, fresh = budget_period(st, lim, u, now)
    if not start then return nil, ends end
    local used = (fresh and 0) or u.bu
    if n > lim.ba - used then
      save_state(st)
      return nil, { 'BUDGET', fmt(math.max(lim.ba - used, 0)), fmt(ends), fmt(ends - now),
                    'B' .. fmt(lim.ba) .. ':' .. lim.bp .. ':' .. lim.bz }
    end
    -- counted from: as before within the period; its start when a period follows another of
    -- the same budget; the next history entry when this budget (period, zone) begins
    local since = (not fresh and u.bc) or (u.bk == lim.bk and fmt(start) .. '-0') or next_id(st, now)
    if u.bf and id_less(since, u.bf) then since = u.bf end
    plan[#plan + 1] = { 'bu', fmt(used + n), 'bs', fmt(start), 'be', fmt(ends), 'bc', since,
                        'bk', lim.bk }
  end
  if lim.ra then
    local ok, after = rate_after(lim, u, now, n)
    if not ok then
      save_state(st)
      return nil, { 'RATE', after, lim.rk }
    end
    plan[#plan + 1] = { 'rb', fmt(now), 'ro', fmt(after), 'rk', lim.rk }
  end
  return plan, nil
end

-- Writes what an accepted charge used of the limits (gate's plan).
local function spend(plan)
  if not plan then return end
  for _, fields in ipairs(plan) do redis.call('HSET', K_STATE, unpack(fields)) end
end

-- The limits in effect and the budget spent in the running period (nothing is written but a
-- save before a PERIOD ask).
-- Reply {'OK', own (1|0), limits (spec, '' = none), budget_used, budget_resets_at ('' = none)}
local function limits_reply(st, now, default)
  local lim, spec = limits_of(st, default)
  local own = (st.lim and '1') or '0'
  if not lim or not lim.ba then return { 'OK', own, spec or '', '0', '' } end
  local u = load_usage()
  local start, ends, fresh = budget_period(st, lim, u, now)
  if not start then return ends end
  return { 'OK', own, spec, fmt((fresh and 0) or u.bu), fmt(ends) }
end

-- Budget comes back: `amount` credits charged (or held) by history entry `charged` (an id; a bare
-- ms for holds made before holds kept their entry's id), if that was counted in the budget period
-- still running at `at`.
local function budget_back(amount, charged, at)
  if amount <= 0 or not charged then return end
  local v = redis.call('HMGET', K_STATE, 'bu', 'bc', 'be')
  if not v[1] or at >= tonumber(v[3]) then return end
  if not string.find(charged, '-', 1, true) then charged = charged .. '-0' end
  if id_less(charged, v[2]) then return end
  redis.call('HSET', K_STATE, 'bu', fmt(math.max(tonumber(v[1]) - amount, 0)))
end

-- ---------------------------------------------------------------------------------------------
-- Members: a pool is an ordinary user whose credits its members spend (subtract and reserve with
-- a member; their history entries say who: field mb). A member may have a cap, a budget of its
-- own per calendar period or fixed window, checked and counted by the script that charges, in the
-- pool's slot (K_MEMBERS: member -> "<cap>|<used>|<start>|<end>|<since>"):
--   cap    the budget's spec, "B<amount>:<period>:<tz>" (as the limits')
--   used   credits the member charged in the period [start, end) from history entry <since> on
-- A period that ended counts from 0 again. A refused charge changes nothing. Credits that come
-- back (a hold's rest, release or ttl, a reversal) come back to the cap if counted in the period
-- still running, as budget does (budget_back). A member without a cap is not counted here.

local function load_member(member)
  if not member or member == '' then return nil end
  local raw = redis.call('HGET', K_MEMBERS, member)
  if not raw then return nil end
  local cap, used, s, e, since = string.match(raw, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  return { cap = cap, lim = parse_limits(cap), used = tonumber(used) or 0, s = tonumber(s),
           e = tonumber(e), since = since }
end

local function member_record(cap, used, s, e, since)
  return cap .. '|' .. fmt(used) .. '|' .. fmt(s) .. '|' .. fmt(e) .. '|' .. since
end

-- May `member` charge n more at `now`? Returns the write that counts it (nil: no member, or no
-- cap), or nil and the refusal (or PERIOD ask) to reply:
--   {'BUDGET', remaining, resets_at ms, retry_after ms, cap spec, member}
local function member_gate(st, member, now, n)
  local m = load_member(member)
  if not m or not m.lim or not m.lim.ba then return nil, nil end
  local start, ends, fresh = period_at(st, m.lim, m.lim.bk, m.s, m.e, now)
  if not start then return nil, ends end
  local used = (fresh and 0) or m.used
  if n > m.lim.ba - used then
    save_state(st)
    return nil, { 'BUDGET', fmt(math.max(m.lim.ba - used, 0)), fmt(ends), fmt(ends - now), m.cap,
                  member }
  end
  local since = (not fresh and m.since ~= '' and m.since) or next_id(st, now)
  return { 'HSET', K_MEMBERS, member, member_record(m.cap, used + n, start, ends, since) }, nil
end

-- Credits `amount` charged (or held) by history entry `charged` come back to `member`'s cap, if
-- they counted in its period still running at `at`.
local function member_back(member, amount, charged, at)
  if amount <= 0 or not charged then return end
  local m = load_member(member)
  if not m or not m.e or at >= m.e or m.since == '' then return end
  if not string.find(charged, '-', 1, true) then charged = charged .. '-0' end
  if id_less(charged, m.since) then return end
  redis.call('HSET', K_MEMBERS, member,
    member_record(m.cap, math.max(m.used - amount, 0), m.s, m.e, m.since))
end

-- ---------------------------------------------------------------------------------------------
-- Holds

local HOLD_STATUS = { a = 'active', c = 'captured', r = 'released', x = 'expired' }

local function split(text, sep)
  local out = {}
  for piece in string.gmatch(text, '[^' .. sep .. ']+') do out[#out + 1] = piece end
  return out
end

-- Puts held credits back into the buckets they came from (re-created if emptied meanwhile).
-- Parts of buckets whose expiry has come by `at` are not restored. Returns restored, expired.
local function restore(st, parts, at)
  local restored, expired = 0, 0
  for _, part in ipairs(split(parts, ';')) do
    local id, credits, priority = string.match(part, '^([^:]+):([^:]+):(.+)$')
    credits = tonumber(credits)
    local expire_at = tonumber(string.sub(id, 1, 15))
    if expire_at ~= NEVER and expire_at <= at then
      expired = expired + credits
    else
      if redis.call('HEXISTS', K_AMOUNTS, id) == 1 then
        redis.call('HINCRBY', K_AMOUNTS, id, credits)
      else
        redis.call('ZADD', K_ORDER, priority, id)
        if expire_at ~= NEVER then
          redis.call('ZADD', K_EXPIRY, fmt(expire_at), id)
          if not st.nx or expire_at < st.nx then st.nx, st.dirty = expire_at, true end
        end
        redis.call('HSET', K_AMOUNTS, id, fmt(credits))
      end
      restored = restored + credits
    end
  end
  return restored, expired
end

-- Gives held credits back to the available balance at `at` and records it (entry `kind`, for
-- all of them, then an "e" entry for the parts whose bucket expired while held). As any grant,
-- what comes back repays a debt first. Returns the entry's id, how much came back, and the
-- balance after that entry (before the "e" entry, if any).
local function give_back(st, hold_id, parts, at, kind, fields)
  local before = st.bal
  local restored, expired = restore(st, parts, at)
  if before < 0 and restored > 0 then take(math.min(restored, -before), nil) end
  st.bal = st.bal + restored + expired
  fields[#fields + 1] = 'h'
  fields[#fields + 1] = hold_id
  fields[#fields + 1] = 't'
  fields[#fields + 1] = fmt(at)
  local id = append(st, kind, restored + expired, at, fields)
  local after = st.bal
  if expired > 0 then
    st.bal = st.bal - expired
    append(st, 'e', -expired, at, { 'h', hold_id })
  end
  return id, restored + expired, after
end

local function hold_timer(st, hold_id, at)
  redis.call('ZADD', K_TIMERS, fmt(at), hold_id)
  if not st.hx or st.hx == 0 or at < st.hx then st.hx = at end
  st.holds_dirty = true
end

-- Finishes a hold: status c/r/x, remembered (for a late second call) until RETAIN has passed;
-- a member's hold keeps its member (field 6, as while active).
local function finish_hold(st, hold_id, rec, status, captured, now)
  st.held = st.held - tonumber(rec[2])
  local done = status .. '|' .. rec[2] .. '|' .. rec[3] .. '|' .. rec[4] .. '|' .. fmt(captured)
  if rec[6] then done = done .. '|' .. rec[6] end
  redis.call('HSET', K_HOLDS, hold_id, done)
  hold_timer(st, hold_id, now + RETAIN)
end

-- The history fields naming a member (none for the account itself).
local function member_fields(member)
  if member and member ~= '' then return { 'mb', member } end
  return {}
end

-- A hold timer is due at `at`: an active hold's ttl has passed (its credits come back, dated at
-- `at`, and it is remembered RETAIN more), or a finished hold's memory ends (it is forgotten).
local function hold_timer_due(st, hold_id, at)
  local rec = split(redis.call('HGET', K_HOLDS, hold_id) or 'x', '|')
  redis.call('ZREM', K_TIMERS, hold_id)
  if rec[1] == 'a' then
    give_back(st, hold_id, rec[5] or '', at, 'l', member_fields(rec[6]))
    budget_back(tonumber(rec[2]), rec[4], at)
    member_back(rec[6], tonumber(rec[2]), rec[4], at)
    finish_hold(st, hold_id, rec, 'x', 0, at)
  else
    redis.call('HDEL', K_HOLDS, hold_id)
  end
end

-- Reply {'OK', hold_id, amount, status, created_at, expires_at, captured}
local function hold_reply(hold_id, rec)
  local created = string.match(rec[4], '^%d+')  -- the "r" entry's ms
  return { 'OK', hold_id, rec[2], HOLD_STATUS[rec[1]], created, rec[3], rec[5] or '0' }
end

-- ---------------------------------------------------------------------------------------------
-- Every script starts here

-- The first member of an event zset (expiries or timers) and its time, if due by `now`. `bound`
-- is the state's note that nothing is due before it (nil or 0: unknown); it may be too early,
-- never too late, so a bound past `now` spares the look-up. Returns member, time, new bound.
local function first_due(key, bound, now)
  if bound and bound ~= 0 and bound > now then return nil, nil, bound end
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  local at = tonumber(first[2]) or NEVER
  if at > now then return nil, nil, at end
  return first[1], at, at
end

-- Loads the user and brings it up to now: whatever fell due since its last operation (cycle
-- boundaries, hold ttls, bucket expiries, holds to forget) happens, each at its own time, in time
-- order; at the same millisecond the cycle boundary comes first, then holds, then buckets.
-- Returns the state, or nil and the reply to return: SCHEDULE or INCONSISTENT (nothing written
-- then), or CATCHUP (MAX_EVENTS events applied and saved, more are due: the client sends the
-- call again).
local function up_to_now(now, extension)
  local st, bad = load_state()
  if not st then return nil, bad end
  local zone_ask = usage_zone(st, now, extension)
  if zone_ask then return nil, zone_ask end
  local c = nil
  if st.ce and st.cst ~= 'e' and now >= st.ce then
    c = load_cycle()
    if c.crn == '1' and c.cst == 'a' and c.cdur == '' then
      local ask = ensure_schedule(c, now, extension)
      if ask then return nil, ask end
    end
  end
  local budget, started = MAX_EVENTS, nil
  while true do
    local at, what, which = nil, nil, nil
    if c and c.crn == '1' and c.cst == 'a' and now >= tonumber(c.ce) then
      at, what = tonumber(c.ce), 'cycle'
    end
    -- A bound at or past the earliest event found so far cannot beat it: no look-up then
    -- (a renewing cycle's grant bucket always ends on the next boundary, which comes first).
    if st.hx and (not at or st.hx == 0 or st.hx < at) then  -- absent: never had a hold
      local id, t, bound = first_due(K_TIMERS, st.hx, now)
      if bound ~= st.hx then st.hx, st.holds_dirty = bound, true end
      if id and (not at or t < at) then at, what, which = t, 'hold', id end
    end
    if not at or not st.nx or st.nx == 0 or st.nx < at then
      local id, t, bound = first_due(K_EXPIRY, st.nx, now)
      if bound ~= st.nx then
        st.nx = bound
        if st.ms > 0 then st.dirty = true end  -- a user with no history has no state to update
      end
      if id and (not at or t < at) then at, what, which = t, 'bucket', id end
    end
    if not what then break end
    if not started then
      started = micros()
    elseif budget % CHECK_EVERY == 0 and micros() - started > CATCHUP_US then
      budget = 0  -- this step took its time
    end
    if budget == 0 then  -- more is due: save this step, the client calls again
      if c then save_cycle(c, st) end
      save_state(st)
      return nil, { 'CATCHUP' }
    end
    budget = budget - 1
    if what == 'cycle' then
      renew(st, c, now)
    elseif what == 'hold' then
      hold_timer_due(st, which, at)
    else
      expire_bucket(st, which, at)
    end
  end
  if c then
    if now >= tonumber(c.ce) then c.cst = 'e' end
    save_cycle(c, st)
  end
  return st, nil
end

-- An active hold's record, or nil and the reply for a missing or finished one.
local function active_hold(st, hold_id)
  local raw = redis.call('HGET', K_HOLDS, hold_id)
  if not raw then
    save_state(st)
    return nil, { 'NO_HOLD' }
  end
  local rec = split(raw, '|')
  if rec[1] ~= 'a' then
    save_state(st)
    return nil, { 'HOLD_DONE', HOLD_STATUS[rec[1]] }
  end
  return rec, nil
end
