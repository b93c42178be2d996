#!lua
-- end_run: mark a workflow run ended (every later save is refused); list its sessions.
-- The run hash and its session set lose their TTL: they may not be evicted before every
-- session of the run is cleaned (settle_run gives them one back).
-- KEYS[1] run hash          <prefix>:{sNNN}:run:<tenant>:<run>
-- KEYS[2] run session set   <prefix>:{sNNN}:run:<tenant>:<run>:sessions
-- ARGV[1] outcome: text (succeeded, partial_succeeded, failed, aborted; a conversation's:
--         ended); ended_at is Redis's TIME
-- returns {0, member...}  OK: the run is ended now (members of KEYS[2]: <node>:<binding>:<agent>,
--                         or a full session name in sets written before short members)
--         {1, member...}  RUN_ENDED: it had already ended; outcome and time kept
local run, run_sessions = KEYS[1], KEYS[2]
local outcome = ARGV[1]

local code = 0
if redis.call('HGET', run, 'state') == 'ended' then
  code = 1
else
  local now = iso_of(now_ms())
  redis.call('HSET', run, 'state', 'ended', 'ended_at', now, 'outcome', outcome)
  redis.call('HSETNX', run, 'opened_at', now)
  redis.call('PERSIST', run)
  redis.call('PERSIST', run_sessions)
end
local reply = redis.call('SMEMBERS', run_sessions)
table.insert(reply, 1, code)
return reply
