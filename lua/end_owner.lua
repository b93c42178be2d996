#!lua
-- end_owner: mark an owner ended (every later save is refused); list its sessions.
-- The owner is a workflow run or a conversation. Its hash and its session set lose their TTL:
-- they may not be evicted before every session of it is cleaned (settle_owner gives them one
-- back).
-- KEYS[1] owner hash        <prefix>:{sNNN}:run:<tenant>:<run>
--                           or <prefix>:{sNNN}:conversation:<tenant>:<conversation>
-- KEYS[2] owner session set KEYS[1]..':sessions'
-- ARGV[1] outcome: text (succeeded, partial_succeeded, failed, aborted; a conversation's:
--         ended); ended_at is Redis's TIME
-- returns {0, member...}  OK: the owner is ended now (members of KEYS[2]: <node>:<binding>:<agent>,
--                         or a full session name in sets written before short members)
--         {1, member...}  OWNER_ENDED: it had already ended; outcome and time kept
local owner, owner_sessions = KEYS[1], KEYS[2]
local outcome = ARGV[1]

local code = 0
if redis.call('HGET', owner, 'state') == 'ended' then
  code = 1
else
  local now = iso_of(now_ms())
  redis.call('HSET', owner, 'state', 'ended', 'ended_at', now, 'outcome', outcome)
  redis.call('HSETNX', owner, 'opened_at', now)
  redis.call('PERSIST', owner)
  redis.call('PERSIST', owner_sessions)
end
local reply = redis.call('SMEMBERS', owner_sessions)
table.insert(reply, 1, code)
return reply
