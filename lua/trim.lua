--[[ trim.lua: one bounded step of history retention: record a checkpoint, trim what it covers.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 now_ms ('' = server TIME) | 2 extension (calendar boundaries, usage zone)
      3 base (the checkpoint id the client replayed from; '' = none) | 4 upto (the last entry the
      new checkpoint covers) | 5 checkpoint (its JSON, from credici_redis._core.audit.Replay)
      6 retention_ms (entries younger than this stay) | 7 forget (' '-separated ids of trimmed
      entries whose reversal is trimmed too: their 'v:' marks go)
Reply {'OK', trimmed (entries removed)}
      | {'STALE', checkpoint (id now; '' = none)} (another pass got there first: nothing changed)
      | {'TOO_NEW', retained_from ms} (upto is within the retention: nothing changed)
      | {'ARCHIVED'} (the user's history goes to PostgreSQL: the archiver trims it, not this)
      | SCHEDULE | ZONE | CATCHUP | INCONSISTENT
History: renewals, holds released by their ttl, expired buckets (as any call); entries up to `upto` leave the stream (XTRIM MINID, at most the client's step).
The client (credici_redis._ops.retention) read those entries after the checkpoint `base`,
replayed them from it (the audit's replay) and found nothing wrong; the new checkpoint is what
they add up to. The audit replays from the newest checkpoint on.
]]
--!include _ledger.lua

local now, base, upto = clock(ARGV[1]), ARGV[3], ARGV[4]
local keep_ms = tonumber(ARGV[6])

local st, ask = up_to_now(now, ARGV[2])
if ask then return ask end
save_state(st)
local current = redis.call('GET', K_CHECKPOINT)
local current_id = ''
if current then current_id = string.match(current, '^[^\n]*') end
if current_id ~= base then return { 'STALE', current_id } end
if redis.call('HEXISTS', K_STATE, 'ar') == 1 then return { 'ARCHIVED' } end
local ms, seq = id_parts(upto)
if ms >= now - keep_ms then return { 'TOO_NEW', fmt(now - keep_ms) } end

redis.call('SET', K_CHECKPOINT, upto .. '\n' .. ARGV[5])
local after = fmt(ms) .. '-' .. fmt(seq + 1)
local trimmed = redis.call('XTRIM', K_HISTORY, 'MINID', after)
local mark = redis.call('HGET', K_STATE, 'tm')
if not mark or id_less(mark, after) then redis.call('HSET', K_STATE, 'tm', after) end
local forget = { 'HDEL', K_STATE }
for id in string.gmatch(ARGV[7], '%S+') do forget[#forget + 1] = 'v:' .. id end
if #forget > 2 then redis.call(unpack(forget)) end
return { 'OK', trimmed }
