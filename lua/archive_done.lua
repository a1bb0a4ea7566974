--[[ archive_done.lua: PostgreSQL has committed a user's history up to an id; let Redis forget
what it may.
KEYS  1-13 the user's keys (see _ledger.lua); 14 the trim queue of the user's slot (zset:
      history key -> ms of its oldest archived entry still kept; due once older than keep)
ARGV  1 clock ('' = server TIME) | 2 the archived-up-to id the archiver read ('' = none)
      3 the last id now committed to PostgreSQL | 4 how many entries that was
      5 keep (ms): archived entries younger than this stay in Redis (reverse needs them)
Reply {'OK', entries still pending, entries trimmed} | {'STALE', archived-up-to id} (another
      archiver got there first: nothing changed)
- Entries up to ARGV[3] and older than now - keep are trimmed (XTRIM MINID); tm records the mark.
- The slot's outbox keeps the user, scored by its oldest entry still to archive, or drops it.
- The trim queue holds the user while archived entries wait for their keep time to pass.
History: none (the history stream loses its archived entries once older than keep).
]]
--!include _ledger.lua

local K_TRIMQ = KEYS[14]
local now = clock(ARGV[1])
local before, upto, count, keep = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])

local current = redis.call('HGET', K_STATE, 'ar') or ''
if current ~= before then return { 'STALE', current } end
if upto ~= '' and upto ~= current then
  redis.call('HSET', K_STATE, 'ar', upto)
  current = upto
end
local pending = tonumber(redis.call('HGET', K_STATE, 'pn') or '0')
if count > 0 then pending = redis.call('HINCRBY', K_STATE, 'pn', fmt(-count)) end

-- Trim: below min(the entry after the archived-up-to id, now - keep).
local trimmed = 0
if current ~= '' then
  local ms, sq = id_parts(current)
  local mark = fmt(ms) .. '-' .. fmt(sq + 1)
  local horizon = fmt(now - keep) .. '-0'
  if id_less(horizon, mark) then mark = horizon end
  trimmed = redis.call('XTRIM', K_HISTORY, 'MINID', mark)
  local old = redis.call('HGET', K_STATE, 'tm')
  if trimmed > 0 and (not old or id_less(old, mark)) then
    redis.call('HSET', K_STATE, 'tm', mark)
  end
  -- Archived entries kept for now: come back when the oldest of them is due.
  local first = redis.call('XRANGE', K_HISTORY, '-', '+', 'COUNT', 1)
  if #first > 0 and not id_less(current, first[1][1]) then
    redis.call('ZADD', K_TRIMQ, id_parts(first[1][1]), K_HISTORY)
  else
    redis.call('ZREM', K_TRIMQ, K_HISTORY)
  end
end

local after = '-'
if current ~= '' then after = '(' .. current end
local next_entry = redis.call('XRANGE', K_HISTORY, after, '+', 'COUNT', 1)
if #next_entry == 0 then
  redis.call('ZREM', K_OUTBOX, K_HISTORY)
else
  redis.call('ZADD', K_OUTBOX, id_parts(next_entry[1][1]), K_HISTORY)
end
return { 'OK', pending, trimmed }
