--[[ balance.lua: expire what is due, then read the balance. Writes only when something expired.
KEYS  1-5 the user's keys (see _ledger.lua)
ARGV  1 clock ('' = server TIME)
Reply {'OK', balance}
History: "e" entries for buckets that expired.
]]
--!include _ledger.lua

local st = load_state()
purge(st, clock(ARGV[1]))
save_state(st)
return { 'OK', fmt(st.bal) }
