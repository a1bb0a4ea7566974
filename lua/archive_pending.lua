--[[ archive_pending.lua: what the archiver has still to copy of one user's history.
KEYS  1-13 the user's keys (see _ledger.lua)
ARGV  1 most entries to return
Reply {archived up to ('' = nothing yet), entries pending, id, {field, value, ...}, id, {...}, ...}
      the entries after the archived-up-to id, oldest first
Reads only: the archiver copies these to PostgreSQL, commits, then runs archive_done.lua.
History: none (reads only).
]]
--!include _ledger.lua

local archived = redis.call('HGET', K_STATE, 'ar')
local low = '-'
if archived then low = '(' .. archived end
local entries = redis.call('XRANGE', K_HISTORY, low, '+', 'COUNT', tonumber(ARGV[1]))
local reply = { archived or '', redis.call('HGET', K_STATE, 'pn') or '0' }
for i = 1, #entries do
  reply[#reply + 1] = entries[i][1]
  reply[#reply + 1] = entries[i][2]
end
return reply
