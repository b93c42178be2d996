#!lua
-- fill: read-through; write a session loaded from Postgres, as clean, if Redis has none, or
-- (ARGV[2] = "behind") if Redis holds a clean copy of an older version: Redis went back in
-- time behind what reached Postgres, and nothing of its copy is unflushed.
-- KEYS[1] session hash      <prefix>:{sNNN}:session:<tenant>:<run>:<node>:<binding>:<agent>
--                           (or a conversation's: ...:conversation-session:...)
-- KEYS[2] owner session set <prefix>:{sNNN}:run:<tenant>:<run>:sessions (or
--                           ...:conversation:<tenant>:<conversation>:sessions; members: the
--                           last three parts of KEYS[1])
-- ARGV[1] TTL of the filled session (and of a new run session set): integer milliseconds
-- ARGV[2] "behind" to replace a clean, older copy; "" to write only where there is none
-- ARGV[3..] field, value pairs (version and flushed_version included); "" = no field
-- returns {0}  OK: filled
--         {5}  EXISTS: the key is present (newer, or with unflushed changes); nothing written

local session, owner_sessions, ttl, behind = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
if redis.call('EXISTS', session) == 1 then
  local held = redis.call('HMGET', session, 'version', 'flushed_version')
  local version, flushed = tonumber(held[1]), tonumber(held[2] or '-1')
  local filled = -1
  for i = 3, #ARGV, 2 do
    if ARGV[i] == 'version' then
      filled = tonumber(ARGV[i + 1])
    end
  end
  if behind ~= 'behind' or not version or flushed < version or version >= filled then
    return {5}
  end
  redis.call('DEL', session)
end
local sets = {}
for i = 3, #ARGV, 2 do
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
