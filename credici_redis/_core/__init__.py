"""The ledger without I/O: keys, time, calendar schedules, the Lua scripts, request checks,
the flows of commands and replies (`protocol`), the audit's replay."""
