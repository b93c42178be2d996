#!lua
-- fill: read-through; write a session loaded from Postgres only if Redis has none, as clean.
-- KEYS[1] session hash      <prefix>:{sNNN}:session:<tenant>:<run>:<node>:<binding>:<agent>
--                           (or a conversation's: ...:conversation-session:...)
-- KEYS[2] owner session set <prefix>:{sNNN}:run:<tenant>:<run>:sessions (or
--                           ...:conversation:<tenant>:<conversation>:sessions; members: the
--                           last three parts of KEYS[1])
-- ARGV[1] TTL of the filled session (and of a new run session set): integer milliseconds
-- ARGV[2..] field, value pairs (version and flushed_version included); "" = no field
-- returns {0}  OK: filled
--         {5}  EXISTS: the key is present (it may be newer); nothing written

local session, owner_sessions, ttl = KEYS[1], KEYS[2], ARGV[1]
if redis.call('EXISTS', session) == 1 then
  return {5}
end
local sets = {}
for i = 2, #ARGV, 2 do
  if ARGV[i + 1] ~= '' then
    sets[#sets + 1] = ARGV[i]
    sets[#sets + 1] = ARGV[i + 1]
  end
end
redis.call('HSET', session, unpack(sets))
redis.call('PEXPIRE', session, ttl)
-- a new set gets the TTL; an existing one keeps its own (none while its run is ended)
local fresh = redis.call('EXISTS', owner_sessions) == 0
redis.call('SADD', owner_sessions, member_of(session))
if fresh then
  redis.call('PEXPIRE', owner_sessions, ttl)
end
return {0}
